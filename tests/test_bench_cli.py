"""llava-bench: the benchmark scripts under one command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from llava_rt.benchmarks.cli import BENCHMARKS, main

ROOT = Path(__file__).resolve().parents[1]


def test_lists_every_benchmark_and_refuses_an_unknown_one(capsys):
    assert main([]) == 0
    listed = capsys.readouterr().out
    for name, (module, _) in BENCHMARKS.items():
        assert f"  {name} " in listed
        assert (ROOT / "benchmarks" / f"{module}.py").exists()
    assert main(["latencyy"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark 'latencyy'" in err and "latency" in err


def test_latency_runs_both_sides_and_writes_json(tmp_path, capsys):
    out = tmp_path / "latency.json"
    assert main(["latency", "--preset", "tiny", "--repeats", "1", "--new-tokens", "4", "--text-tokens", "5",
                 "--batch", "1", "2", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "llava-rt torch" in table and "transformers generate" in table
    report = json.loads(out.read_text())
    assert report["benchmark"] == "engine-cpu" and report["machine"]["cores"] >= 1
    rows = {(r["engine"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {(e, b) for e in ("llava-rt torch", "transformers generate") for b in (1, 2)}
    for r in rows.values():
        assert r["ttft_ms"] > 0 and r["decode_tok_s_per_seq"] > 0
        assert abs(r["decode_tok_s_total"] - r["decode_tok_s_per_seq"] * r["batch"]) < 0.2


def test_scripts_still_run_as_files():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--help"],
                          capture_output=True, text=True, cwd="/")
    assert done.returncode == 0 and "--preset" in done.stdout, done.stderr
