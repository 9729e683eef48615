"""One benchmark child: a single-process ``torchrun`` whose output is streamed line by line.

Shared by ``throughput``, ``checkpoint_stall`` and ``startup``: each passes its own ``on_line`` to
pick out what it measures; the child gets its own process group so a timeout kills it whole.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class ChildRun:
    lines: list[str]
    """The child's stdout and stderr, colour codes removed."""
    returncode: int | None
    timed_out: bool
    wall_s: float

    @property
    def status(self) -> str:
        if self.timed_out:
            return "timeout"
        return "ok" if self.returncode == 0 else f"exit {self.returncode}"


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment, unbuffered, with the repository importable (``bench.proxy``)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_torchrun(
    entry: list[str], env: dict[str, str], timeout: float, on_line: Callable[[str, float], None] | None = None
) -> ChildRun:
    """``torchrun --standalone --nproc_per_node 1 <entry...>``; ``on_line(line, seconds since start)``
    sees every line as it arrives. Stops reading (and kills the child) after ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *entry]
    return run_command(cmd, env, timeout, on_line)


def run_command(
    cmd: list[str],
    env: dict[str, str],
    timeout: float,
    on_line: Callable[[str, float], None] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> ChildRun:
    """Any command (e.g. ``run_llama_train.sh``) streamed the same way; ``on_start(proc)`` gets the
    process first (to signal it from ``on_line``)."""
    lines: list[str] = []
    timed_out = False
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    if on_start is not None:
        on_start(proc)
    try:
        for raw in proc.stdout:  # type: ignore[union-attr]
            line = ANSI.sub("", raw.rstrip())
            lines.append(line)
            now = time.monotonic() - start
            if on_line is not None:
                on_line(line, now)
            if now > timeout:
                timed_out = True
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait()
    return ChildRun(lines, proc.returncode, timed_out, time.monotonic() - start)
