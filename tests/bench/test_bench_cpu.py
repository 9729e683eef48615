"""The GPU benchmark harness at toy size on the CPU, so it cannot rot between GPU runs."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_throughput_harness_runs_at_toy_size(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--mode", "cpu", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = list(tmp_path.glob("*.json"))
    assert results, "the harness writes a results file"
    report = json.loads(results[0].read_text())
    assert report["meta"]["versions"]["torchtitan"] == "0.2.2" and report["meta"]["date"]
    groups = {r["group"] for r in report["results"] if r["status"] == "ok" and r["tps"] > 0}
    assert {"stock", "ours"} <= groups, "stock and ours measured side by side in one run"
    assert report["summary"]["bf16"]["ratio"] > 0


@pytest.mark.slow
def test_goodput_harness_runs_the_schedule_for_both_sides_at_toy_size(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.goodput",
            "--cpu",
            "--out",
            str(tmp_path),
            "--ckpt-root",
            str(tmp_path / "ck"),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("goodput-*.json")
    report = json.loads(result.read_text())
    ours, stock = report["sides"]["ours"], report["sides"]["stock"]
    for side in (ours, stock):
        assert side["finished"] and len(side["launches"]) == 4  # three signals, three restarts
        assert [r["exit"] for r in side["launches"]][-1] == 0
        assert side["median_step_s"] > 0 and 0 < side["ettr"] < 1
        assert 0 < side["projection"]["ettr"] < 1
    assert [r["exit"] for r in ours["launches"][:3]] == [143, 143, 143]
    assert ours["redone_steps"] == 0 and stock["redone_steps"] > 0  # ours saves at the signal, stock cannot
    assert ours["ledger"]["found"] and abs(ours["ledger"]["diff_pct"]) < 2
    assert (tmp_path / result.name.replace(".json", ".md")).read_text().startswith("# Goodput")
