"""llava-infer end to end on a random tiny checkpoint, and every bad input it must refuse cleanly."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from llava_rt.random_checkpoint import make_random_checkpoint
from llava_rt.runtime.infer_cli import main

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "shapes.png")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", "tiny", std=0.2)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_clean_error(code, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llava-infer: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_answer_streams_and_json_agrees(model_dir, capsys):
    code, streamed, err = run_cli(capsys, "--model", model_dir, EXAMPLE, "What is in the image?", "--max-new-tokens", "12")
    assert code == 0 and err == ""
    code, out, _ = run_cli(capsys, "--model", model_dir, EXAMPLE, "What is in the image?", "--max-new-tokens", "12", "--json")
    result = json.loads(out)
    assert code == 0
    assert streamed == result["answer"] + "\n"
    assert result["completion_tokens"] <= 12 and result["prompt_tokens"] > 16
    assert result["ttft_s"] > 0 and result["total_s"] >= result["ttft_s"]
    assert result["finish_reason"] in ("stop", "length")


def test_text_only_question(model_dir, capsys):
    code, out, _ = run_cli(capsys, "--model", model_dir, "--no-image", "Hello there", "--max-new-tokens", "5", "--json")
    assert code == 0
    text_only = json.loads(out)["prompt_tokens"]
    with_image = json.loads(run_cli(capsys, "--model", model_dir, EXAMPLE, "Hello there", "--max-new-tokens", "5", "--json")[1])
    assert with_image["prompt_tokens"] - text_only >= 16  # the tiny preset's 16 image slots are absent


def test_sampling_flags_are_seeded(model_dir, capsys):
    args = ["--model", model_dir, EXAMPLE, "Describe it", "--temperature", "1.0", "--top-p", "0.9", "--seed", "3",
            "--max-new-tokens", "10", "--json"]
    first = json.loads(run_cli(capsys, *args)[1])["answer"]
    assert json.loads(run_cli(capsys, *args)[1])["answer"] == first


def test_interactive_chat(model_dir, monkeypatch, capsys):
    answers = iter(["What is this?", "And the colors?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    code, out, err = run_cli(capsys, "--model", model_dir, EXAMPLE, "--max-new-tokens", "4")
    assert code == 0 and err == ""
    assert out.count("ASSISTANT: ") == 2


def test_missing_image(model_dir, tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    assert_one_clean_error(*run_cli(capsys, "--model", model_dir, missing, "q")[::2], str(missing))


def test_corrupt_image(model_dir, tmp_path, capsys):
    path = tmp_path / "broken.png"
    Image.new("RGB", (64, 64), "red").save(path)
    path.write_bytes(path.read_bytes()[:60])
    assert_one_clean_error(*run_cli(capsys, "--model", model_dir, path, "q")[::2], "broken.png")


def test_not_an_image(model_dir, tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am text")
    assert_one_clean_error(*run_cli(capsys, "--model", model_dir, path, "q")[::2], "notes.txt")


def test_image_over_pixel_limit(model_dir, tmp_path, capsys):
    path = tmp_path / "big.png"
    Image.new("RGB", (400, 300)).save(path)
    assert_one_clean_error(*run_cli(capsys, "--model", model_dir, path, "q", "--max-image-pixels", "1000")[::2], "big.png")


@pytest.mark.parametrize("question", ["", "   \n"])
def test_empty_question(model_dir, capsys, question):
    assert_one_clean_error(*run_cli(capsys, "--model", model_dir, EXAMPLE, question)[::2], "question is empty")


def test_prompt_longer_than_context(model_dir, capsys):
    question = " ".join(["circle square triangle"] * 400)
    assert_one_clean_error(*run_cli(capsys, "--model", model_dir, EXAMPLE, question)[::2], "context")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"])
def test_model_dir_missing_file(model_dir, tmp_path, capsys, missing):
    broken = tmp_path / "broken-model"
    shutil.copytree(model_dir, broken)
    (broken / missing).unlink()
    assert_one_clean_error(*run_cli(capsys, "--model", broken, EXAMPLE, "q")[::2], missing)


def test_model_dir_corrupt_weights(model_dir, tmp_path, capsys):
    broken = tmp_path / "corrupt-model"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_clean_error(*run_cli(capsys, "--model", broken, EXAMPLE, "q")[::2], "model.safetensors")


def test_model_dir_not_found(tmp_path, capsys):
    assert_one_clean_error(*run_cli(capsys, "--model", tmp_path / "absent", EXAMPLE, "q")[::2], "absent")


def test_console_script_has_no_traceback(model_dir, tmp_path):
    """The installed command, as a user runs it: one line on stderr, exit 1."""
    exe = shutil.which("llava-infer") or pytest.skip("llava-infer is not on PATH")
    proc = subprocess.run([exe, "--model", str(model_dir), str(tmp_path / "missing.png"), "q"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    ok = subprocess.run([sys.executable, "-m", "llava_rt.runtime.infer_cli", "--model", str(model_dir), EXAMPLE, "Hi",
                         "--max-new-tokens", "3"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
