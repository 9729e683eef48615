"""torchtitan_runai.lifetime: a process dies with its parent (the kernel's parent-death signal), also
when the parent was gone before it asked; what is left of a launcher's run is found by its mark.

Real processes and real SIGKILLs; each child script imports this checkout's package.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from torchtitan_runai import lifetime

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, sys.argv[3])
    from torchtitan_runai import lifetime
    parent = int(sys.argv[1])
    while sys.argv[2] == "late" and os.getppid() == parent:
        time.sleep(0.05)  # the parent is gone before this process asks
    lifetime.die_with_parent(parent, signal.SIGKILL)
    if sys.argv[2] == "now":  # (a late child's pipe has no reader: printing would end it)
        print("asked", flush=True)
    time.sleep(60)
""")

PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2], sys.argv[3]],
                             stdout=subprocess.PIPE, text=True)
    print(child.pid, flush=True)
    if sys.argv[2] == "late":
        os._exit(0)
    child.stdout.readline()
    print("ready", flush=True)
    time.sleep(60)
""")


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _state(pid) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    return _state(pid) in (None, "Z")


def _parent(mode: str) -> tuple[subprocess.Popen, int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, mode, str(REPO)], stdout=subprocess.PIPE, text=True)
    return parent, int(parent.stdout.readline())


def test_a_child_dies_when_its_parent_is_killed():
    parent, child = _parent("now")
    try:
        assert parent.stdout.readline().strip() == "ready"
        parent.kill()  # SIGKILL: nothing runs in the parent
        parent.wait()
        assert _gone_within(child, 5), "the child outlived its parent"
    finally:
        parent.kill()
        if _state(child) not in (None, "Z"):
            os.kill(child, signal.SIGKILL)


def test_a_child_whose_parent_died_before_it_asked_dies_at_once():
    parent, child = _parent("late")
    parent.wait()
    try:
        assert _gone_within(child, 10), "the child of a parent that died before it asked lives on"
    finally:
        if _state(child) not in (None, "Z"):
            os.kill(child, signal.SIGKILL)


def test_the_processes_of_a_run_are_found_by_the_launchers_mark():
    mark = lifetime.launcher_mark()
    assert mark.split()[0] == str(os.getpid()) and lifetime.launcher_pid({lifetime.LAUNCHER_ENV: mark}) == os.getpid()
    assert lifetime.launcher_pid({}) is None
    env = {**os.environ, lifetime.LAUNCHER_ENV: mark}
    member = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert lifetime.processes_of(mark) == [member.pid]
    finally:
        for p in (member, other):
            p.kill()
            p.wait()
    assert lifetime.processes_of(mark) == []
