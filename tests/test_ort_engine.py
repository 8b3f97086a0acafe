"""The onnxruntime engine: torch-free llava-infer, automatic backend choice, batching, and refused artifacts."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llava_rt.export.onnx_export import export_onnx
from llava_rt.random_checkpoint import make_random_checkpoint
from llava_rt.runtime.engine import SequenceInput, load_engine
from llava_rt.runtime.generate import GenerationRequest, generate
from llava_rt.runtime.kv_cache import CacheFullError
from llava_rt.runtime.manifest import ArtifactError, read_manifest
from llava_rt.runtime.ort_engine import OrtEngine
from llava_rt.runtime.sampling import SamplingParams

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "shapes.png")
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny checkpoint (with tokenizer) and its export in MODEL_DIR/onnx."""
    path = make_random_checkpoint(tmp_path_factory.mktemp("ort") / "tiny", "tiny", std=0.2)
    export_onnx(path, path / "onnx", progress=False)
    return path


def infer(*argv, check=True):
    code = "import sys; from llava_rt.runtime.infer_cli import main; rc = main(sys.argv[1:]); " \
           "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr); sys.exit(rc)"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_onnxruntime_path_never_imports_torch(model_dir):
    proc = infer("--model", model_dir, "--backend", "onnxruntime", EXAMPLE, QUESTION, "--max-new-tokens", "16", "--json")
    assert "NO_TORCH" in proc.stderr
    result = json.loads(proc.stdout)
    assert result["backend"] == "onnxruntime" and result["completion_tokens"] > 0


def test_auto_backend_and_same_answer_as_torch(model_dir):
    auto = json.loads(infer("--model", model_dir, EXAMPLE, QUESTION, "--max-new-tokens", "24", "--json").stdout)
    torch_run = json.loads(infer("--model", model_dir, "--backend", "torch", EXAMPLE, QUESTION, "--max-new-tokens", "24",
                                 "--json").stdout)
    assert auto["backend"] == "onnxruntime" and torch_run["backend"] == "torch"
    assert auto["answer"] == torch_run["answer"]
    export_only = infer("--model", model_dir / "onnx", EXAMPLE, QUESTION, "--max-new-tokens", "24", "--json")
    assert json.loads(export_only.stdout)["answer"] == auto["answer"] and "NO_TORCH" in export_only.stderr


def requests(engine, seed=0):
    cfg = engine.config
    rng = np.random.default_rng(seed)
    out = []
    for i, n_text in enumerate([4, 30, 11, 1, 19]):
        text = rng.integers(3, 250, n_text).tolist()
        if i % 2 == 0:
            ids = [1, 5] + [cfg.image_token_index] * cfg.image_seq_length + text
            size = cfg.vision_config.image_size
            emb = engine.encode_images(rng.standard_normal((1, 3, size, size)).astype(np.float32))
        else:
            ids, emb = [1] + text, None
        out.append(GenerationRequest(ids, emb, SamplingParams(max_new_tokens=6 + 5 * i)))
    return out


def test_batched_equals_alone_and_frees_cache(model_dir):
    engine = load_engine(model_dir, backend="onnxruntime", block_size=4)
    reqs = requests(engine)
    together = generate(engine, reqs, eos_token_ids=set())
    for req, out in zip(reqs, together):
        assert out.token_ids == generate(engine, [req], eos_token_ids=set())[0].token_ids
    assert engine.num_free_blocks == engine.blocks.num_blocks and not engine.caches


def test_chunked_prefill_equals_whole(model_dir):
    engine = OrtEngine.load(model_dir)
    ids = requests(engine)[1].prompt_ids
    whole = engine.prefill([SequenceInput(1, ids)])
    engine.prefill([SequenceInput(2, ids[:7])])
    chunked = engine.prefill([SequenceInput(2, ids[7:])])
    np.testing.assert_allclose(chunked, whole, atol=1e-5, rtol=0)
    assert engine.seq_len(2) == len(ids)


def test_cache_full_and_bad_image_slots_lose_nothing(model_dir):
    block_bytes = 2 * 2 * 4 * 2 * 32 * 4  # K+V, 2 layers, 4 tokens, 2 kv heads, head_dim 32, fp32
    engine = OrtEngine.load(model_dir, block_size=4, kv_cache_bytes=3 * block_bytes)
    assert engine.blocks.num_blocks == 3
    with pytest.raises(CacheFullError, match="KV cache full"):
        engine.prefill([SequenceInput(1, [1] * 13)])
    with pytest.raises(ValueError, match="image-token slots"):
        engine.prefill([SequenceInput(2, [1] + [engine.config.image_token_index] * engine.config.image_seq_length)])
    assert engine.num_free_blocks == engine.blocks.num_blocks and engine.seq_len(1) == 0


def test_external_data_export_loads(model_dir, tmp_path):
    out = export_onnx(model_dir, tmp_path / "ext", external_data=True, progress=False)
    assert (out / "decoder.onnx.data").is_file() and (out / "vision.onnx.data").is_file()
    graph_only, inline = (out / "decoder.onnx").stat().st_size, (model_dir / "onnx" / "decoder.onnx").stat().st_size
    assert graph_only < inline / 4  # the weights live in the .data file
    ids = requests(OrtEngine.load(model_dir))[1].prompt_ids
    inline = OrtEngine.load(model_dir).prefill([SequenceInput(1, ids)])
    external = OrtEngine.load(out).prefill([SequenceInput(1, ids)])
    np.testing.assert_array_equal(inline, external)


# ----------------------------------------------------------------------------- refused artifacts


@pytest.fixture
def copy(model_dir, tmp_path):
    """A private copy of the checkpoint and its export, to break."""
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


def test_edited_manifest_is_refused(copy):
    path = copy / "onnx" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["opset"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="edited after export.*llava-export"):
        OrtEngine.load(copy / "onnx")


def test_missing_file_is_refused(copy):
    (copy / "onnx" / "decoder.onnx").unlink()
    with pytest.raises(ArtifactError, match="decoder.onnx is missing.*rebuild it: llava-export"):
        OrtEngine.load(copy)


def test_truncated_file_is_refused(copy):
    path = copy / "onnx" / "embed_tokens.npy"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="differs from the one exported"):
        read_manifest(copy / "onnx")


def test_export_of_another_checkpoint_is_refused(copy, tmp_path):
    other = make_random_checkpoint(tmp_path / "other", "tiny", seed=1)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(other / name, copy / name)  # new weights, same shapes: only the hash tells
    with pytest.raises(ArtifactError, match=f"exported from another checkpoint.*llava-export {copy} --out {copy / 'onnx'}"):
        OrtEngine.load(copy)
    forced = infer("--model", copy, "--backend", "onnxruntime", EXAMPLE, QUESTION, check=False)
    lines = [line for line in forced.stderr.splitlines() if line != "NO_TORCH"]
    assert forced.returncode == 1 and len(lines) == 1 and "another checkpoint" in lines[0]
    auto = infer("--model", copy, EXAMPLE, QUESTION, "--max-new-tokens", "4", "--json")
    assert json.loads(auto.stdout)["backend"] == "torch" and "not using" in auto.stderr


def test_copied_checkpoint_with_new_mtimes_still_matches(copy):
    os.utime(copy / "model.safetensors", (1, 1))  # fingerprint differs, content does not: full hash decides
    assert OrtEngine.load(copy).backend == "onnxruntime"
