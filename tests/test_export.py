"""llava-export: fp32 ONNX equals our torch model on every variant; fp16/int8/int4 reported by the verifier."""

import json

import onnx
import pytest

from llava_rt.export.cli import main as export_main
from llava_rt.export.onnx_export import export_onnx
from llava_rt.export.verify import verify_export
from tiny import make_checkpoint, tiny_config

# Together the variants cover GQA / MHA / MQA, feature layer int and list (incl. the embeddings
# output, layer 0), both CLS strategies, linear and MLP projectors, tied and untied heads, and an
# image token id outside the embedding table.
VARIANTS = {
    "gqa-mlp-default": tiny_config(num_kv_heads=2),
    "mha-linear-full-tied-layers": tiny_config(num_kv_heads=4, feature_layer=[-3, -1], strategy="full",
                                                projector="linear", tie=True),
    "mqa-linear-gelu-oov-image-token": tiny_config(num_kv_heads=1, feature_layer=-1, projector="linear",
                                                   vision_act="gelu", image_token_index=300),
    "gqa-mlp-full-tied-layer0": tiny_config(num_kv_heads=2, feature_layer=[0, -2], strategy="full", tie=True),
}
PAIRS_PER_VARIANT = 5  # 4 variants x 5 = 20 image+question pairs, each batched and unbatched
NEW_TOKENS = 64


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_export_matches_torch(variant, tmp_path):
    model_dir = make_checkpoint(tmp_path / "model", VARIANTS[variant])
    out = export_onnx(model_dir, tmp_path / "onnx", progress=False)
    for name in ("vision.onnx", "decoder.onnx"):
        onnx.checker.check_model(str(out / name))
    report = verify_export(out, model_dir, "fp32", pairs=PAIRS_PER_VARIANT, new_tokens=NEW_TOKENS)
    assert report["vision"]["max_abs_diff"] < 1e-4
    for mode in ("batched", "unbatched"):
        result = report["decoder"][mode]
        assert result["max_abs_diff"] < 1e-4, (mode, result)
        assert result["identical_answers"] == PAIRS_PER_VARIANT, (mode, result)
    assert report["ok"] and report["drifted"] == []


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    # Init scale of real models (0.02): at the parity tests' 0.2, Gaussian weights on 64-wide layers
    # are the worst case for 4-bit round-to-nearest and int4 answers part from fp32 after a token or two.
    return make_checkpoint(tmp_path_factory.mktemp("lowp") / "model", VARIANTS["gqa-mlp-default"], std=0.02)


@pytest.mark.parametrize("flags", [["--dtype", "fp16"], ["--quantize", "int8"], ["--quantize", "int4"]])
def test_low_precision_reported_by_verifier(flags, gqa_model, tmp_path, capsys):
    out = tmp_path / "onnx"
    code = export_main([str(gqa_model), "--out", str(out), *flags, "--verify-pairs", "2", "--verify-tokens", "8", "--quiet"])
    printed = capsys.readouterr().out
    dtype = flags[1]
    assert code == 0, printed
    assert f"verification ({dtype}," in printed and "greedy agreement" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    report = manifest["verification"]
    assert report["dtype"] == dtype and report["ok"]
    assert 0.0 <= report["decoder"]["batched"]["greedy_agreement"] <= 1.0
    ops = {n.op_type for n in onnx.load(str(out / "decoder.onnx")).graph.node}
    assert ("MatMulNBits" in ops) == (dtype != "fp16")
    if dtype == "fp16":
        assert manifest["graphs"]["decoder"]["inputs"][0]["dtype"] == "float16"


def test_verifier_names_the_drifting_graph(gqa_model, tmp_path, capsys):
    """An impossible tolerance must fail the export, name decoder.onnx, and leave an artifact the runtime refuses."""
    out = tmp_path / "onnx"
    code = export_main([str(gqa_model), "--out", str(out), "--quantize", "int4", "--tolerance", "1e-9",
                        "--verify-pairs", "1", "--verify-tokens", "4", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "decoder.onnx drifted" in err and "vision.onnx" not in err
    from llava_rt.runtime.manifest import ArtifactError, read_manifest

    with pytest.raises(ArtifactError, match="failed verification"):
        read_manifest(out)


def test_bad_model_dir_is_one_clean_error(tmp_path, capsys):
    assert export_main([str(tmp_path / "nope"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llava-export: error: ") and "not found" in err[0]
