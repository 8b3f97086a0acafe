"""llava-bench: the benchmark scripts under one command; the timing ones time their baseline in the same run.

    llava-bench                       list the benchmarks
    llava-bench latency [ARGS]        = python benchmarks/bench_engine.py [ARGS]
    llava-bench latency --help        that benchmark's own options

Each benchmark prints a table and writes JSON (benchmarks/results/NAME-DATE.json in a source
checkout, ./llava-bench-results/ otherwise; --out PATH to choose) with the machine it ran on.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, what it compares); the modules' docstrings say how.
BENCHMARKS = {
    "latency": ("bench_engine", "TTFT and decode tokens/s: our torch engine vs transformers generate (CPU)"),
    "onnxruntime": ("bench_ort", "the same with onnxruntime fp32 / int8 / int4 beside them (CPU)"),
    "cold-start": ("bench_cold_start", "process start to last token: llava-infer (onnxruntime, torch) vs a transformers script"),
    "serve": ("bench_serve", "llava-serve under a concurrency sweep vs transformers one request at a time"),
    "gpu-e2e": ("bench_gpu_e2e", "LLaVA-1.5-7B shapes on a GPU: TTFT, decode, 32 concurrent, vs transformers (--smoke: CPU)"),
    "kernels": ("bench_kernels", "each Triton kernel vs torch / SDPA / cuBLAS with the card's ceilings (--smoke: CPU)"),
    "fusions": ("bench_fusions", "which fusions pay at LLaVA-1.5-7B shapes: RMSNorm, q/k/v and gate/up GEMMs (GPU only)"),
    "decode-sweep": ("sweep_decode", "launch settings of the paged decode attention kernel (--smoke: CPU)"),
    "profile": ("profile_gpu", "where the torch engine's GPU time goes, per phase (--smoke: CPU)"),
    "export-7b": ("export_7b", "export LLaVA-1.5-7B shapes to ONNX and load the files"),
}


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    rows = "\n".join(f"  {name.ljust(width)}  {what}" for name, (_, what) in BENCHMARKS.items())
    return f"usage: llava-bench BENCHMARK [ARGS] (llava-bench BENCHMARK --help for its options)\n\nbenchmarks:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"llava-bench: no benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"llava_rt.benchmarks.{BENCHMARKS[name][0]}")
    module.main(rest, prog=f"llava-bench {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
