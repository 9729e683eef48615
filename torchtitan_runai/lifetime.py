"""No process of a run outlives its launcher: the kernel's parent-death signal, and the mark that finds
what is left.

A run is a tree of processes: the launcher (torchrun's agent runs inside it, ``launcher/launch.py``),
the workers the agent starts (``train.py``, each in a session of its own: torchrun starts them with
``start_new_session``), and under each worker DCP's checkpoint-writing process
(``training/checkpoint/upload.py``, SIGTERM and SIGINT blocked on purpose). When the launcher is
killed with ``kill -9`` (a killed ``docker run``, a node agent, a person) nothing of it runs again:
it cannot forward a signal, and its workers, in their own sessions, get nothing from the terminal
or a process-group kill either. Before this module they trained on as orphans, their writing
processes finished and started uploads, and a rerun, finding the launcher's pid gone, took the
folder's lock and wrote beside them.

Why the parent-death signal (``prctl(PR_SET_PDEATHSIG)``), and not a process group or a pipe:

- it is the kernel's: it acts however the parent dies, SIGKILL and the OOM killer included, and
  costs nothing while the parent lives; nothing in the dying process has to run;
- a process-group or session kill needs someone alive to send it; and the workers are not in the
  launcher's group (``start_new_session``), which is how torchrun keeps a terminal's Ctrl-C away
  from them;
- a pipe watch (EOF once the parent is gone) needs a thread in every process reading it, and DCP's
  writing process already reads its pipe only between uploads: during an upload, the moment that
  matters, it would write on.

Each process asks for it itself, at its start, as a child of the process it must not outlive
(``die_with_parent``):

- a worker (``training/trainer:run``), SIGKILL when the launcher dies. Not SIGTERM: the launcher
  that would wait for the preemption save and report it is gone, and a rank stuck in a collective
  would never act on it; the run resumes from its newest complete checkpoint, as after a crashed
  node. The launcher tells its workers its pid and start time in ``LAUNCHER_ENV``.
- DCP's writing process (``training/checkpoint/upload.py``), SIGKILL when its worker dies (SIGKILL
  because it blocks SIGTERM); an upload in flight stops where it is and its step folder, never
  marked complete, is set aside by the next run.

The "parent" the kernel watches is the *thread* that created the process: a child is signalled when
that thread exits, even when the rest of the process lives on. The agent runs on the launcher's main
thread, which starts (and restarts) the workers and lives as long as the launcher; the thread that
spawns the writing process stays alive until the writing process is stopped (``upload.py``).

A parent that died before its child asked (the child is then already someone else's) is caught by
comparing ``os.getppid()`` with the pid the parent left it, after asking: the child then sends itself
the same signal.

What is left of a run is found by the mark every descendant of the launcher inherits: ``LAUNCHER_ENV
= "<pid> <start ticks>"`` of the launcher (unique on this machine since boot), in
``/proc/<pid>/environ`` (``processes_of``). The folder's lock uses it (``checkpoint/ownership``): a
lock whose launcher is gone still holds while any process of its run is alive on this machine.
"""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path
from typing import Mapping

LAUNCHER_ENV = "TORCHTITAN_RUNAI_LAUNCHER"
"""``"<pid> <start ticks>"`` of the launcher whose run this process belongs to (``launcher_mark``)."""

PR_SET_PDEATHSIG = 1


def start_ticks(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell it from a later one with the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def launcher_mark(pid: int | None = None) -> str:
    """``LAUNCHER_ENV``'s value for the launcher ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid} {start_ticks(pid) or ''}".strip()


def launcher_pid(env: Mapping[str, str]) -> int | None:
    """The launcher's pid from ``env``'s ``LAUNCHER_ENV`` (None outside the launcher)."""
    try:
        return int(env.get(LAUNCHER_ENV, "").split()[0])
    except (IndexError, ValueError):
        return None


def die_with_parent(parent: int | None, sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel for ``sig`` when the thread that created this process exits (module docstring).

    ``parent``: the pid this process must not outlive, as the parent knew it; when the parent is
    already gone (``os.getppid()`` differs: this process was handed to another), ``sig`` is sent to
    this process at once. None: the parent this process has now. Returns False where the kernel has
    no such call (not Linux): nothing is set.
    """
    parent = os.getppid() if parent is None else parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # gone before we asked: the signal it would have sent
        os.kill(os.getpid(), sig)
    return True


def processes_of(mark: str) -> list[int]:
    """The live processes on this machine (this pid namespace) whose environment carries
    ``LAUNCHER_ENV=mark``: what is left of that launcher's run. Zombies (already stopped, only an exit
    status left) and this process are not counted; processes of another user cannot be read and are
    not counted either."""
    needle = f"{LAUNCHER_ENV}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and needle in environ.split(b"\0"):
            found.append(int(entry))
    return sorted(found)
