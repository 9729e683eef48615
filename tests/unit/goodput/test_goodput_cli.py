"""python -m torchtitan_runai.goodput: finds the ledger from any of the job's folders, prints, draws."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_report import launch, segment

from torchtitan_runai.jsonio import write_json_atomic

REPO = Path(__file__).resolve().parents[3]


def goodput(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torchtitan_runai.goodput", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def job_folder(tmp_path: Path) -> Path:
    ledger = tmp_path / "run1" / "checkpoint" / "goodput"
    ledger.mkdir(parents=True)
    (ledger.parent / "job.json").write_text("{}")
    seg = segment("launch-1", 101.0, resume=0, last=20, saves=(10, 20), durable=20, outcome="finished")
    write_json_atomic(ledger / "launch-000000000100000-1.json", launch("launch-1", 100.0, seg["last_seen"] + 1))
    write_json_atomic(ledger / "segment-000000000101000-2.json", seg)
    return tmp_path / "run1"


def test_the_output_folder_gives_the_table_and_a_png_beside_it(tmp_path):
    run = job_folder(tmp_path)
    proc = goodput(str(run))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("goodput: ")
    assert "productive" in proc.stdout and "ended: finished" in proc.stdout
    assert (run / "goodput.png").stat().st_size > 5_000


def test_the_checkpoint_or_ledger_folder_work_too_and_json_is_parseable(tmp_path):
    run = job_folder(tmp_path)
    for folder in (run / "checkpoint", run / "checkpoint" / "goodput"):
        proc = goodput(str(folder), "--json", "-o", str(tmp_path / "g.png"))
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["seconds"]["productive"] > 0 and len(summary["segments"]) == 1
    assert (run / "goodput.png").exists() is False  # -o took it elsewhere


def test_a_folder_without_a_ledger_is_one_clear_line(tmp_path):
    proc = goodput(str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds no goodput ledger" in proc.stderr and "Fix: pass the job's output folder" in proc.stderr
