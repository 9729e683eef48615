"""Workers never outlive their launcher (issue 24): ``kill -9`` of the launcher's pid alone (a killed
``docker run``, a node agent, a person), on the GPU pod's path modelled on CPU: the real launcher,
2 ranks over gloo, ``async_with_pinned_mem`` (each rank has DCP's checkpoint-writing process, started
at trainer start, SIGTERM blocked there), an upload in flight on a slow volume
(``slow_storage/sitecustomize.py``).

Every process of the run is found from outside, the way a person would look for orphans: the test
puts a variable of its own into the launcher's environment, which every descendant inherits (the
agent's workers, their writing processes, multiprocessing's resource trackers), and scans
``/proc/*/environ`` for it. Before the fix the ranks kept training and their writing processes kept
writing into the folder, and a rerun took the lock over beside them.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

from resilience_util import run, start, train_args, wait_for_step
from test_preemption import slow_env, uploading, wait_until

from torchtitan_runai.checkpoint.ownership import LOCK

MARK = "TORCHTITAN_RUNAI_TEST_ORPHAN_MARK"
PINNED = ["--checkpoint.async_mode", "async_with_pinned_mem", "--debug.seed", "1234"]
GONE_WITHIN_S = 15.0


def run_processes(mark: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries ``MARK=mark``."""
    needle = f"{MARK}={mark}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if state != "Z" and needle in environ:  # a zombie has stopped; only its exit status is left
            found[int(entry)] = cmdline.strip()
    return found


def writing_processes(processes: dict[int, str]) -> list[int]:
    """DCP's checkpoint-writing processes: multiprocessing ``spawn`` children of the ranks."""
    return [pid for pid, cmd in processes.items() if "spawn_main" in cmd]


def test_kill9_of_the_launcher_stops_every_process_of_the_run_and_a_rerun_trains_alone(tmp_path):
    mark = uuid.uuid4().hex
    launcher = start(tmp_path, train_args(tmp_path, 40, 2, *PINNED), "first.log", **slow_env(), **{MARK: mark})
    try:
        wait_for_step(tmp_path, 2, launcher)
        step2 = tmp_path / "out/checkpoint/step-2"
        wait_until("the step-2 upload", lambda: uploading(step2), launcher)
        before = run_processes(mark)
        writers = writing_processes(before)
        assert launcher.pid in before and len(writers) == 2, before  # the launcher, and a writer per rank
        os.kill(launcher.pid, signal.SIGKILL)  # its pid only: not its process group, not its session
        launcher.wait(10)
        killed = time.monotonic()
        left = run_processes(mark)
        while left and time.monotonic() - killed < GONE_WITHIN_S:
            time.sleep(0.1)
            left = run_processes(mark)
        took = time.monotonic() - killed
        assert not left, f"still running {GONE_WITHIN_S:.0f}s after kill -9 of the launcher: {left}"
        print(f"{len(before) - 1} processes of the run gone {took:.2f}s after kill -9 of the launcher")
    finally:
        for pid in run_processes(mark):  # the orphans of a launcher without the fix
            os.kill(pid, signal.SIGKILL)
    assert uploading(step2), "the upload in flight was left as it was (no .metadata): no one wrote on"
    assert (tmp_path / "out/checkpoint" / LOCK).exists()  # the killed launcher's lock, left behind

    # the rerun takes the folder over (its holder is gone, and nothing of its run is left) and trains alone
    code, log = run(tmp_path, train_args(tmp_path, 4, 2, *PINNED), log_name="rerun.log", **{MARK: mark})
    assert code == 0, log[-3000:]
    assert "Detected an existing checkpoint" not in log and "overwriting" not in log, log[-3000:]
    assert "training finished: step 4 of 4" in log
    assert not run_processes(mark)
    assert not (tmp_path / "out/checkpoint" / LOCK).exists()
