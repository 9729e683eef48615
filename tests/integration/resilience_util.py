"""Helpers for the resilience tests: run the real launcher, find its worker ranks, read traces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = "./train_configs/debug_model.toml"
sys.path.insert(0, str(REPO))


def read_trace(path) -> dict[int, str]:
    """step -> loss (hex) from a trace file; a step repeated after a restart keeps its last value."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out[rec["step"]] = rec["loss"]
    return out


def launch_env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "MASTER_", "JOB_", "TORCHELASTIC"))}
    env.update(
        NGPU="2",
        CONFIG_FILE=CONFIG,
        TORCHTITAN_RUNAI_STEP_TRACE=str(tmp / "trace.jsonl"),
        PYTHONUNBUFFERED="1",
        LOG_RANK="all",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_args(tmp: Path, steps: int, interval: int, *more: str) -> list[str]:
    return [
        "--training.steps",
        str(steps),
        "--checkpoint.interval",
        str(interval),
        "--job.dump_folder",
        str(tmp / "out"),
        "--metrics.log_freq",
        "1",
        *more,
    ]


def start(tmp: Path, args: list[str], log_name: str = "log.txt", **env) -> subprocess.Popen:
    log = open(tmp / log_name, "w")
    return subprocess.Popen(
        [str(REPO / "run_llama_train.sh"), *args],
        cwd=REPO,
        env=launch_env(tmp, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(p: subprocess.Popen, tmp: Path, log_name: str, timeout: float = 240) -> tuple[int, str]:
    """Wait for a launch started by ``start`` (its whole group is killed past ``timeout``); (exit code, log)."""
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return rc, (tmp / log_name).read_text()


def run(tmp: Path, args: list[str], timeout: float = 240, log_name: str = "log.txt", **env) -> tuple[int, str]:
    return finish(start(tmp, args, log_name, **env), tmp, log_name, timeout)


def trace_steps(tmp: Path) -> list[dict]:
    path = tmp / "trace.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(tmp: Path, step: int, proc: subprocess.Popen, timeout: float = 180, restart: int | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step and (restart is None or r["restart"] == restart) for r in trace_steps(tmp)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited {proc.returncode} before step {step}")
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout}s")


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the launcher's worker processes (torchrun's agent runs inside the launcher)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = int(pid)
    return out


def losses(tmp: Path) -> dict[int, str]:
    return read_trace(tmp / "trace.jsonl")
