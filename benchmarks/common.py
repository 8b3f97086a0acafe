"""Shared bits of the benchmark scripts: machine facts, medians, table printing, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

# A source checkout writes beside the scripts (benchmarks/results/, committed with the machine that made
# them); an installed copy writes under the current directory.
_HERE = Path(__file__).resolve().parent
RESULTS = _HERE / "results" if (_HERE.parent / "pyproject.toml").exists() else Path.cwd() / "llava-bench-results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["transformers"] = version("transformers")
    except Exception:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def write_json(name: str, payload: dict, out: Path | None = None) -> Path:
    today = datetime.date.today().isoformat()
    path = out or RESULTS / f"{name}-{today}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": today, "machine": machine_info(), **payload}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def cuda_graph_seconds(fn, calls: int = 20, reps: int = 5) -> float:
    """Median GPU seconds of one fn() call: `calls` calls captured in a CUDA graph, replayed `reps`
    times. A small kernel's time is then its GPU time, not its Python launch cost."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the capture: compiles, autotunes, library handles
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return median(times)
