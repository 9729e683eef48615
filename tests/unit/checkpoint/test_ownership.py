"""torchtitan_runai.checkpoint.ownership: job.json, lock.json and the shared-folder check.

Checkpoints here are real DCP checkpoints written by torch.distributed.checkpoint (one process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from torchtitan_runai import lifetime
from torchtitan_runai.checkpoint import ownership
from torchtitan_runai.errors import UserError
from torchtitan_runai.jsonio import read_json, write_json_atomic

REPO = Path(__file__).resolve().parents[3]


def test_job_identity_and_folder_ownership(tmp_path):
    folder = tmp_path / "ckpt"
    assert ownership.claim_folder(folder, {"JOB_UUID": "u1", "JOB_NAME": "n"}) == "u1"
    assert ownership.claim_folder(folder, {"JOB_UUID": "u1"}) == "u1"  # restart: stale lock is fine
    with pytest.raises(UserError, match="belongs to another job"):
        ownership.claim_folder(folder, {"JOB_UUID": "u2"})
    with pytest.raises(UserError, match="take_over_folder"):
        ownership.claim_folder(folder, {})
    assert ownership.claim_folder(folder, {"JOB_UUID": "u2"}, take_over=True) == "u2"
    assert json.loads((folder / ownership.OWNER).read_text())["previous"]["job"] == "u1"


def test_job_without_identity_chooses_one_and_keeps_it(tmp_path):
    first = ownership.claim_folder(tmp_path, {})
    assert first.startswith("chosen-")
    assert ownership.claim_folder(tmp_path, {}) == first
    with pytest.raises(UserError):
        ownership.claim_folder(tmp_path, {"JOB_NAME": "named"})


# --- issue 16: a live holder keeps the folder; a dead one does not ------------------------------


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_lock_of_a_live_process_on_this_machine_refuses_a_second_run(tmp_path):
    # main let a second run without JOB_UUID/JOB_NAME take the lock over while the first trained
    holder = _sleeper()
    try:
        record = {
            **ownership.lock_record(None),
            "pid": holder.pid,
            "pid_start": ownership._start_ticks(holder.pid),
            "heartbeat": time.time() - 3600,
        }  # no heartbeat needed: the pid answers
        write_json_atomic(tmp_path / ownership.LOCK, record)
        with pytest.raises(UserError) as err:
            ownership.acquire_lock(tmp_path, None)
        assert str(tmp_path) in err.value.line() and f"pid {holder.pid}" in err.value.why
        assert "job.dump_folder" in err.value.fix
    finally:
        holder.kill()
        holder.wait()
    # the same lock once its process is gone (a restart after kill -9): taken over
    assert ownership.acquire_lock(tmp_path, None)["pid"] == os.getpid()


def _killed_launcher_and_survivor() -> tuple[dict, subprocess.Popen]:
    """The lock of a launcher killed with kill -9, and a process of its run that is still alive (it
    carries the launcher's mark, as every worker and writing process does)."""
    launcher = _sleeper()
    record = {**ownership.lock_record(None), "pid": launcher.pid, "pid_start": ownership._start_ticks(launcher.pid)}
    env = {**os.environ, lifetime.LAUNCHER_ENV: lifetime.launcher_mark(launcher.pid)}
    survivor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    launcher.kill()
    launcher.wait()
    return record, survivor


def test_a_rerun_never_takes_the_folder_beside_a_survivor_of_a_killed_launcher(tmp_path, monkeypatch):
    # main took the lock over as soon as the launcher's pid was gone, its workers still writing
    record, survivor = _killed_launcher_and_survivor()
    try:
        write_json_atomic(tmp_path / ownership.LOCK, record)
        monkeypatch.setattr(ownership, "SURVIVOR_WAIT_S", 0.5)
        began = time.monotonic()
        with pytest.raises(UserError) as err:
            ownership.acquire_lock(tmp_path, None)
        assert time.monotonic() - began >= 0.5  # it waited for the survivor first
        assert f"pid {record['pid']}, is gone" in err.value.why and f"pids {survivor.pid}" in err.value.why
        assert f"kill -9 {survivor.pid}" in err.value.fix and str(tmp_path) in err.value.line()
        assert read_json(tmp_path / ownership.LOCK) == record  # the lock is left as it was
        # a survivor that stops while the rerun waits (the parent-death signal: within seconds)
        monkeypatch.setattr(ownership, "SURVIVOR_WAIT_S", 30.0)
        threading.Timer(1.0, survivor.kill).start()
        began = time.monotonic()
        assert ownership.acquire_lock(tmp_path, None)["pid"] == os.getpid()
        assert 0.9 < time.monotonic() - began < 10
    finally:
        survivor.kill()
        survivor.wait()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    record = {**ownership.lock_record(None), "pid": os.getppid(), "pid_start": "1"}  # alive, but started later
    assert ownership.holder_alive(record) == (False, f"pid {os.getppid()} on this machine is gone")


def test_lock_elsewhere_lives_while_its_heartbeat_is_fresh(tmp_path):
    elsewhere = {**ownership.lock_record("job"), "host": "other-pod", "boot_id": "another-kernel", "pid": 7}
    now = time.time()
    assert ownership.holder_alive({**elsewhere, "heartbeat": now - 5}, now)[0]
    assert not ownership.holder_alive({**elsewhere, "heartbeat": now - ownership.LOCK_STALE_S - 1}, now)[0]
    write_json_atomic(tmp_path / ownership.LOCK, {**elsewhere, "heartbeat": now})
    with pytest.raises(UserError, match="heartbeat is 0s old"):
        ownership.acquire_lock(tmp_path, "job")
    assert ownership.acquire_lock(tmp_path, "job", take_over=True)["host"] == socket.gethostname()


def test_an_earlier_container_of_this_pod_is_gone():
    # same host name (the pod), another pid namespace: the container that ran before this one
    earlier = {**ownership.lock_record("job"), "pid_ns": "pid:[1]", "pid": 1, "heartbeat": time.time()}
    assert ownership.holder_alive(earlier) == (False, "an earlier container of this pod")


def test_two_runs_starting_together_get_one_lock(tmp_path):
    # the lock file is created with a hard link: of two racing acquirers exactly one wins
    script = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from torchtitan_runai.checkpoint import ownership\n"
        f"import time; time.sleep(max(0, {time.time() + 2} - time.time()))\n"
        f"try:\n    ownership.acquire_lock({str(tmp_path)!r}, None); print('won'); time.sleep(3)\n"
        "except Exception as e:\n    print('refused', type(e).__name__)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused UserError"] * 3 + ["won"], outcomes


def test_folder_lock_beats_and_releases(tmp_path):
    record = ownership.acquire_lock(tmp_path, None)
    hold = ownership.FolderLock(tmp_path, record, interval=0.05)
    first = record["heartbeat"]
    time.sleep(0.3)
    assert read_json(tmp_path / ownership.LOCK)["heartbeat"] > first
    hold.release()
    assert not (tmp_path / ownership.LOCK).exists()
