"""Time of `python -m torchtitan_runai.preflight` (budget: 10 s on the 2-core CPU machine).

    python -m bench.preflight_time --runs 5 --out bench/results

Writes preflight-time-<date>-<host>.json with wall and CPU seconds per run (CPU time is what a
busy shared machine cannot inflate) and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one_run(config: str, dump: str) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchtitan_runai.preflight",
            "--config",
            config,
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--gpu-memory-gib",
            "80",
            "--dry-run",
            "--job.dump_folder",
            dump,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", default="train_configs/llama3_8b.toml")
    parser.add_argument("--out", default="bench/results")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as dump:
        runs = [one_run(a.config, dump) for _ in range(a.runs)]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "config": a.config,
        "budget_s": 10,
        "wall_s": [round(w, 2) for w, _, _ in runs],
        "cpu_s": [round(c, 2) for _, c, _ in runs],
        "exit_codes": [rc for _, _, rc in runs],
        "median_wall_s": round(statistics.median(w for w, _, _ in runs), 2),
        "median_cpu_s": round(statistics.median(c for _, c, _ in runs), 2),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"preflight-time-{report['date']}-{platform.node() or 'host'}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0 if all(rc == 0 for rc in report["exit_codes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
