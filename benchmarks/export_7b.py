"""Export LLaVA-1.5-7B shapes (random fp16 weights) to ONNX and check that the files load.

    python benchmarks/export_7b.py --work /big/disk/dir [--out PATH] [--ort]
    python benchmarks/export_7b.py --work /tmp/x --preset tiny --ort     # the same steps in seconds

Three child processes, one after another, so that each one's peak memory is its own:
  1. checkpoint  python -m llava_rt.random_checkpoint WORK/ckpt --preset llava-1.5-7b --dtype float16
  2. export      llava-export WORK/ckpt --out WORK/onnx --dtype fp16 --no-verify
  3. load        onnx.checker on each graph by path; onnx.load with its external data (every
                 initializer's bytes counted against the checkpoint's); with --ort, an
                 onnxruntime CPU session for each graph (the decoder needs ~2x its 13 GB)
Each step's wall time and peak resident memory (the child's ru_maxrss) go to the JSON. Needs
~30 GB of disk in WORK and, without --ort, about 16 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llava_rt.benchmarks.common import print_table, write_json

LOAD_CHECK = r"""
import json, sys, time
from pathlib import Path
import onnx
from onnx.external_data_helper import uses_external_data
out, use_ort = Path(sys.argv[1]), sys.argv[2] == "1"
report = {}
for name in ("vision", "decoder"):
    path = out / f"{name}.onnx"
    t0 = time.perf_counter()
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))  # external data loaded too
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    r = {"checker_and_load_s": round(time.perf_counter() - t0, 1), "initializers": len(model.graph.initializer),
         "initializer_bytes": sum(len(t.raw_data) for t in model.graph.initializer),
         "still_external_after_load": len(external),
         "files": sorted(p.name for p in out.iterdir() if p.name.startswith(name + ".onnx"))}
    del model
    if use_ort:
        import onnxruntime as ort
        t0 = time.perf_counter()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        r["ort_session_s"] = round(time.perf_counter() - t0, 1)
        r["ort_inputs"] = [i.name for i in session.get_inputs()]
        del session
    report[name] = r
print(json.dumps(report))
"""


def child(cmd: list[str]) -> tuple[float, float, str]:
    """Run cmd; (wall s, its peak RSS GiB, stdout). Children run one at a time, so RUSAGE_CHILDREN's
    maximum after each is the largest so far: each step reports what it raised it to."""
    shown = ["python", "-c", "LOAD_CHECK"] if cmd[1] == "-c" else ["python", *(Path(c).name for c in cmd[1:6])]
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(shown)} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(f"[{time.strftime('%H:%M:%S')}] done in {wall:.1f} s", flush=True)
    if proc.returncode != 0:
        sys.exit(f"export_7b: {' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    return wall, peak, proc.stdout


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="a directory with ~30 GB free (made, then removed)")
    p.add_argument("--ort", action="store_true", help="also open each graph in onnxruntime (needs ~30 GB of memory)")
    p.add_argument("--keep", action="store_true", help="keep WORK afterwards")
    p.add_argument("--preset", default="llava-1.5-7b", choices=["tiny", "mid", "llava-1.5-7b"])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    ckpt, out = args.work / "ckpt", args.work / "onnx"
    args.work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rows = []
    try:
        wall, peak, _ = child([py, "-m", "llava_rt.random_checkpoint", str(ckpt), "--preset", args.preset,
                               "--dtype", "float16"])
        ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        rows.append({"step": "checkpoint", "wall_s": round(wall, 1), "peak_rss_GiB": round(peak, 1),
                     "GB": round(ckpt_bytes / 1e9, 2)})
        wall, peak, _ = child([py, "-m", "llava_rt.export.cli", str(ckpt), "--out", str(out), "--dtype", "fp16",
                               "--no-verify", "--quiet"])
        onnx_bytes = sum(f.stat().st_size for f in out.iterdir() if ".onnx" in f.name)
        rows.append({"step": "export", "wall_s": round(wall, 1), "peak_rss_GiB": round(peak, 1),
                     "GB": round(onnx_bytes / 1e9, 2)})
        manifest = json.loads((out / "manifest.json").read_text())
        wall, peak, stdout = child([py, "-c", LOAD_CHECK, str(out), "1" if args.ort else "0"])
        loaded = json.loads(stdout.strip().splitlines()[-1])
        rows.append({"step": "load", "wall_s": round(wall, 1), "peak_rss_GiB": round(peak, 1),
                     "GB": round(sum(g["initializer_bytes"] for g in loaded.values()) / 1e9, 2)})
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print_table(rows, ["step", "wall_s", "peak_rss_GiB", "GB"])
    for name, r in loaded.items():
        print(f"{name}: files {r['files']}, {r['initializers']} initializers, {r['initializer_bytes'] / 1e9:.2f} GB "
              f"loaded" + (f", onnxruntime session in {r['ort_session_s']} s" if "ort_session_s" in r else ""))
    path = write_json("export-7b" if args.preset == "llava-1.5-7b" else f"export-{args.preset}", {"preset": args.preset, "dtype": "fp16", "checkpoint_GB": rows[0]["GB"],
                                    "steps": rows, "graphs": loaded, "manifest_graphs": manifest["graphs"]}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
