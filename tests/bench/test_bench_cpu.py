"""The GPU benchmark harness at toy size on the CPU, so it cannot rot between GPU runs."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_throughput_harness_runs_at_toy_size(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.throughput", "--mode", "cpu", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = list(tmp_path.glob("*.json"))
    assert results, "the harness writes a results file"
    report = json.loads(results[0].read_text())
    assert report["meta"]["versions"]["torchtitan"] == "0.2.2" and report["meta"]["date"]
    groups = {r["group"] for r in report["results"] if r["status"] == "ok" and r["tps"] > 0}
    assert {"stock", "ours"} <= groups, "stock and ours measured side by side in one run"
    assert report["summary"]["bf16"]["ratio"] > 0
