"""GPU check of the path a pod takes: run_llama_train.sh -> torchrun -> train.py on CUDA/NCCL.

Runs the debug model on one GPU (NGPU=1) three ways and writes a JSON report:
1. uninterrupted, N steps;
2. the same run, SIGTERM to the launcher once step K is logged: expect exit 143 and a full
   checkpoint of the step it stopped at;
3. restarted: expect `resuming from step ...` and the remaining steps' losses next to run 1's.

    python -m bench.gpu_smoke --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*([0-9.]+).*?tps:\s*([0-9,]+)")


def launch(dump: Path, log: Path, steps: int, shape: tuple[int, int], stop_at: int | None = None) -> dict:
    env = {**os.environ, "NGPU": "1", "CONFIG_FILE": "./train_configs/debug_model.toml", "PYTHONUNBUFFERED": "1"}
    args = [
        "bash",
        "run_llama_train.sh",
        "--job.dump_folder",
        str(dump),
        "--training.steps",
        str(steps),
        "--checkpoint.interval",
        "10",
        "--training.seq_len",
        str(shape[0]),
        "--training.local_batch_size",
        str(shape[1]),
        "--debug.seed",
        "7",
        "--lr_scheduler.total_steps",
        str(steps),
    ]
    start = time.monotonic()
    sent = None
    with log.open("w") as f:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            time.sleep(0.2)
            if stop_at is not None and sent is None:
                done = [int(m.group(1)) for m in STEP.finditer(log.read_text())]
                if done and max(done) >= stop_at:
                    proc.send_signal(signal.SIGTERM)
                    sent = time.monotonic()
    text = log.read_text()
    losses = {int(m.group(1)): float(m.group(2)) for m in STEP.finditer(text)}
    tps = [int(m.group(3).replace(",", "")) for m in STEP.finditer(text)]
    resumed = re.search(r"resuming from step (\d+)", text)
    return {
        "exit": proc.returncode,
        "wall_s": round(time.monotonic() - start, 2),
        "signal_to_exit_s": None if sent is None else round(time.monotonic() - sent, 2),
        "losses": losses,
        "median_tps": sorted(tps)[len(tps) // 2] if tps else None,
        "resumed_from": int(resumed.group(1)) if resumed else None,
        "checkpoints": sorted(p.name for p in (dump / "checkpoint").glob("step-*")),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/gpu-smoke")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--stop-at", type=int, default=15)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    a = parser.parse_args()
    shape = (a.seq_len, a.batch)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    full = launch(out / "full", out / "full.log", a.steps, shape)
    cut = launch(out / "cut", out / "cut.log", a.steps, shape, stop_at=a.stop_at)
    again = launch(out / "cut", out / "resume.log", a.steps, shape)
    common = sorted(set(again["losses"]) & set(full["losses"]))
    diff = max((abs(again["losses"][s] - full["losses"][s]) for s in common), default=None)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "uninterrupted": full,
        "sigterm": cut,
        "resumed": again,
        "resumed_vs_uninterrupted_max_abs_loss_diff": diff,
        "steps_compared": len(common),
    }
    try:
        import torch

        report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        report["torch"] = torch.__version__
    except Exception:  # report what ran even without torch in this interpreter
        pass
    (out / "gpu-smoke.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("uninterrupted", "sigterm", "resumed")}))
    print(
        "exits:",
        full["exit"],
        cut["exit"],
        again["exit"],
        "resumed_from:",
        again["resumed_from"],
        "signal_to_exit_s:",
        cut["signal_to_exit_s"],
        "median tps:",
        full["median_tps"],
    )
    ok = full["exit"] == 0 and cut["exit"] == 143 and again["exit"] == 0 and again["resumed_from"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
