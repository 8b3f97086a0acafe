"""Checkpoint -> ONNX export directory (vision.onnx, decoder.onnx, embed_tokens.npy, side files, manifest).

Graphs are traced with torch.onnx's torch.export-based exporter from our one model definition
(export/graphs.py). Graphs stay in onnx_ir form, whose weights are the model's own tensors, until
they are written: a 7B export needs the checkpoint's memory once, not twice. Weights go to
external-data files when a graph passes the 2 GB protobuf limit. Weight-only int8/int4
quantization of the decoder runs onnxruntime's MatMulNBits quantizer (export/quantize.py).
"""

from __future__ import annotations

import logging
import platform
import shutil
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from tqdm import tqdm

import llava_rt
from llava_rt.checkpoint import SIDE_FILES, load_model
from llava_rt.runtime.manifest import checkpoint_fingerprint, checkpoint_sha256, write_manifest

from .graphs import (
    DecoderGraph,
    TensorSpec,
    VisionGraph,
    decoder_dynamic_shapes,
    decoder_example,
    decoder_io,
    vision_example,
    vision_io,
)

DTYPES = {"fp32": (torch.float32, "float32"), "fp16": (torch.float16, "float16")}
QUANTIZATIONS = ("int8", "int4")
DEFAULT_OPSET = 18
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # leave room for the graph itself


class ExportError(RuntimeError):
    """An export that could not be produced (tracing, checking or quantizing failed)."""


def tool_versions() -> dict:
    out = {"python": platform.python_version(), "llava-rt": llava_rt.__version__}
    for name in ("torch", "onnx", "onnxscript", "onnxruntime", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _set_io(model: ir.Model, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Give the graph's inputs/outputs our names for dynamic dims (the tracer writes s17, s29 + s84, ...)."""
    for values, specs in ((model.graph.inputs, inputs), (model.graph.outputs, outputs)):
        by_name = {v.name: v for v in values}
        if set(by_name) != {s.name for s in specs}:
            raise ExportError(f"traced graph IO {sorted(by_name)} differs from the expected {[s.name for s in specs]}")
        for spec in specs:
            value = by_name[spec.name]
            if value.shape is None or len(value.shape) != len(spec.shape):
                rank = None if value.shape is None else len(value.shape)
                raise ExportError(f"{spec.name}: traced rank {rank}, expected {len(spec.shape)}")
            value.shape = ir.Shape(spec.shape)


def _weights_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_graph(model: ir.Model, path: Path, external_data: bool | None) -> list[str]:
    """Write the graph; weights to `<name>.data` when asked or past the protobuf limit, streamed
    from the tensors they are (no protobuf copy). Returns the files."""
    data_name = path.name + ".data"
    (path.parent / data_name).unlink(missing_ok=True)
    use_external = external_data if external_data is not None else _weights_bytes(model) > PROTOBUF_LIMIT
    if use_external:
        ir.save(model, path, external_data=data_name, size_threshold_bytes=1024)
        return [path.name, data_name]
    ir.save(model, path)
    return [path.name]


def _trace(module: torch.nn.Module, args: tuple, dynamic_shapes, inputs, outputs, opset: int) -> ir.Model:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), args, dynamic_shapes=dynamic_shapes, input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs], dynamo=True, opset_version=opset, verbose=False,
        )
    model = program.model
    _set_io(model, inputs, outputs)
    return model


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    progress: bool = True,
) -> Path:
    """Export model_dir into out_dir (replaced whole, atomically). Returns out_dir; verification is separate."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose {', '.join(QUANTIZATIONS)}")
    if quantize is not None and dtype != "fp32":
        raise ValueError("--quantize is weight-only int8/int4 for the CPU on an fp32 graph; use it with --dtype fp32")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    torch_dtype, np_dtype = DTYPES[dtype]
    for name in ("torch.onnx", "onnxscript", "onnx_ir", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)

    steps = ["load checkpoint", "hash checkpoint", "export vision", "export decoder"]
    steps += [f"quantize decoder {quantize}"] if quantize else []
    steps += ["write embeddings + side files", "check graphs"]
    bar = tqdm(total=len(steps), desc="llava-export", unit="step", disable=not progress)

    def step(i: int) -> None:
        bar.set_postfix_str(steps[i])
        bar.update(0 if i == 0 else 1)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        step(0)
        model = load_model(model_dir, dtype=torch_dtype)
        step(1)
        source = {"path": str(model_dir), "checkpoint_sha256": checkpoint_sha256(model_dir),
                  "fingerprint": checkpoint_fingerprint(model_dir)}
        graphs = {}
        step(2)
        v_in, v_out = vision_io(model, np_dtype)
        graph = _trace(VisionGraph(model), vision_example(model), ({0: torch.export.Dim.DYNAMIC},), v_in, v_out, opset)
        graphs["vision"] = {"files": save_graph(graph, tmp / "vision.onnx", external_data),
                            "inputs": [s.to_dict() for s in v_in], "outputs": [s.to_dict() for s in v_out]}
        del graph
        step(3)
        d_in, d_out = decoder_io(model, np_dtype)
        graph = _trace(DecoderGraph(model), decoder_example(model, torch_dtype), decoder_dynamic_shapes(model),
                       d_in, d_out, opset)
        i = 4
        if quantize:
            step(i)
            i += 1
            from .quantize import quantize_weights

            graph = ir.from_proto(quantize_weights(ir.to_proto(graph), bits=8 if quantize == "int8" else 4))
        graphs["decoder"] = {"files": save_graph(graph, tmp / "decoder.onnx", external_data),
                             "inputs": [s.to_dict() for s in d_in], "outputs": [s.to_dict() for s in d_out]}
        del graph
        step(i)
        table = model.language_model.embed_tokens.weight.detach().numpy()
        np.save(tmp / "embed_tokens.npy", table)
        del model, table
        model_config = (model_dir / "config.json").read_bytes()
        (tmp / "config.json").write_bytes(model_config)
        for name in SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        step(i + 1)
        for g in graphs.values():
            onnx.checker.check_model(str(tmp / g["files"][0]))
        write_manifest(tmp, {
            "exporter": {"name": "llava-export", "version": llava_rt.__version__},
            "source": source,
            "formats": ["onnx"],
            "dtype": dtype,
            "quantization": {"method": "MatMulNBits weight-only", "bits": 8 if quantize == "int8" else 4,
                             "graphs": ["decoder"]} if quantize else None,
            "opset": opset,
            "graphs": graphs,
            "embeddings": {"file": "embed_tokens.npy", "dtype": np_dtype},
            "tools": tool_versions(),
        })
        bar.update(1)
        bar.close()
        old = out_dir.parent / f".{out_dir.name}.old"
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
