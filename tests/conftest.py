"""Shared test helpers: run the real launcher, parse its logs, one trained debug run per session."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The helpers beside this file (fakehub, tokgen, ckpt_util) are importable from every test folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
DEBUG_CONFIG = "./train_configs/debug_model.toml"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*([0-9.]+)")
# Environment of a pod: nothing of the cluster shapes leaks in from the developer's shell.
CLUSTER_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NGPU",
    "CONFIG_FILE",
    "OVERRIDE_PET_NNODES",
    "LOG_RANK",
    "MAX_RESTARTS",
    "JOB_UUID",
    "JOB_NAME",
    "OUTPUT_DIR",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_") and k not in CLUSTER_VARS}
    env.update({"PYTHONUNBUFFERED": "1", "PYTHON": sys.executable, "CONFIG_FILE": DEBUG_CONFIG})
    env.update(extra)
    return env


def launcher_cmd(*args: str) -> list[str]:
    return ["bash", str(REPO / "run_llama_train.sh"), *args]


def run_launcher(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(launcher_cmd(*args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def losses(output: str) -> dict[int, float]:
    """step -> loss from torchtitan's `step: N  loss: X` lines (ANSI colours stripped)."""
    found: dict[int, float] = {}
    for line in ANSI.sub("", output).splitlines():
        m = STEP_LINE.search(line)
        if m:
            found[int(m.group(1))] = float(m.group(2))
    return found


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One real 2-rank CPU run of the debug model (12 steps, checkpoints at 6 and 12), shared read-only;
    every rank's output at LOG_LEVEL=debug (each rank logs its seed there)."""
    dump = tmp_path_factory.mktemp("trained") / "dump"
    proc = run_launcher(
        ["--job.dump_folder", str(dump), "--training.steps", "12", "--checkpoint.interval", "6"],
        pod_env(NGPU="2", LOG_RANK="all", LOG_LEVEL="debug"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"dump": dump, "checkpoint": dump / "checkpoint", "stdout": proc.stdout, "stderr": proc.stderr}
