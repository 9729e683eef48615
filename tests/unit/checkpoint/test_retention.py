"""Checkpoint retention (``checkpoint.folder.retain`` and the manager's use of it), on real folders.

Checkpoints are real DCP checkpoints (one process, ``ckpt_util.write_ckpt``); free space is the only
thing faked (``shutil.disk_usage``), so that the room rule can be driven exactly. What the rule keeps
is counted on disk (``scan``) after each call.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ckpt_util import write_ckpt
from torch.distributed.checkpoint.api import CheckpointException

from torchtitan_runai import errors
from torchtitan_runai.checkpoint import folder as ckfolder
from torchtitan_runai.errors import UserError
from torchtitan_runai.goodput.ledger import NullLedger
from torchtitan_runai.training.checkpoint import manager


def age(path: Path, seconds: float = 3600) -> Path:
    """Make a step folder look written ``seconds`` ago (fresh incomplete ones may have a live writer)."""
    then = time.time() - seconds
    for p in [path, *path.iterdir()]:
        os.utime(p, (then, then))
    return path


def incomplete(folder: Path, step: int) -> Path:
    """A cut-off save: shards, no ``.metadata``, no marker."""
    path = write_ckpt(folder, step, mark=False)
    (path / ".metadata").unlink()
    return path


def on_disk(folder: Path) -> dict[int, bool]:
    return {f.step: f.complete for f in ckfolder.scan(folder)}


def free(monkeypatch, nbytes: int) -> None:
    monkeypatch.setattr(ckfolder.shutil, "disk_usage", lambda p: SimpleNamespace(free=nbytes, total=10**12, used=0))


# --- the count rule -------------------------------------------------------------------------------


def test_keeps_the_newest_k_complete_and_drops_older_incomplete_ones(tmp_path):
    for step in (5, 10, 15, 20):
        write_ckpt(tmp_path, step)
    age(incomplete(tmp_path, 12))  # a cut-off save older than the newest complete checkpoint
    in_flight = incomplete(tmp_path, 25)  # newer than every complete one: a save under way
    done = ckfolder.retain(tmp_path, 2)
    assert on_disk(tmp_path) == {25: False, 20: True, 15: True}
    assert [f.step for f in done.removed] == [5, 10, 12]  # oldest first
    assert in_flight.is_dir()
    line = done.line()
    assert "keep_latest_k = 2" in line and "step-5" in line and "step-12" in line and "incomplete" in line
    assert ckfolder.retain(tmp_path, 2).line() is None  # idempotent: nothing more to do


def test_the_newest_complete_and_newest_resumable_are_never_removed(tmp_path):
    write_ckpt(tmp_path, 5)
    for step in (10, 15):  # complete, but model-only (an HF-format final save, say): not resumable
        path = write_ckpt(tmp_path, step)
        record = ckfolder.read_json(path / ckfolder.MARKER)
        ckfolder.mark_complete(path, {**record, "kind": "model-only"})
    ckfolder.retain(tmp_path, 2)
    # still 2: the newest complete one and step 5, the only one a restart can resume from
    assert on_disk(tmp_path) == {15: True, 5: True}
    assert ckfolder.newest_resumable(ckfolder.scan(tmp_path)).step == 5


def test_protected_and_recently_written_folders_are_kept(tmp_path):
    for step in (5, 10, 15):
        write_ckpt(tmp_path, step)
    incomplete(tmp_path, 7)  # written just now: another writer may still be in it
    age(incomplete(tmp_path, 3))  # the caller's own save under way (protect), however old its files
    ckfolder.retain(tmp_path, 2, protect=(3,))
    assert on_disk(tmp_path) == {15: True, 10: True, 7: False, 3: False}


def test_a_removal_cut_off_midway_leaves_no_step_folder_and_the_next_pass_finishes_it(tmp_path, monkeypatch):
    """The process may leave (os._exit, SIGKILL) while retention removes a folder. A half-removed
    ``step-N`` with ``.metadata`` was incomplete and just written into: spared 120 s
    (``LIVE_WRITE_S``), counted as a checkpoint by anyone counting ``step-*/.metadata``."""
    for step in (4, 8, 12):
        write_ckpt(tmp_path, step)
    real_rmtree = shutil.rmtree

    def cut_off(path, *a, **k):  # one shard goes, then the process is gone
        next(p for p in Path(path).iterdir() if p.name.endswith(".distcp")).unlink()
        raise SystemExit("killed mid-removal")

    monkeypatch.setattr(shutil, "rmtree", cut_off)
    with pytest.raises(SystemExit):
        ckfolder.retain(tmp_path, 2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert sorted(int(p.parent.name.split("-")[1]) for p in tmp_path.glob("step-*/.metadata")) == [8, 12]
    ckfolder.retain(tmp_path, 2)
    assert on_disk(tmp_path) == {12: True, 8: True}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".removing")] == []


def test_keep_latest_k_0_keeps_everything_even_when_room_is_short(tmp_path, monkeypatch):
    for step in (5, 10, 15):
        write_ckpt(tmp_path, step)
    free(monkeypatch, 0)
    done = ckfolder.retain(tmp_path, 0, need_bytes=10**6)
    assert not done.removed and len(on_disk(tmp_path)) == 3


# --- the room rule --------------------------------------------------------------------------------


def test_short_room_removes_the_oldest_beyond_the_newest_complete_until_the_save_fits(tmp_path, monkeypatch):
    for step in (5, 10, 15):
        write_ckpt(tmp_path, step)
    size = ckfolder.folder_bytes(tmp_path / "step-15")
    free(monkeypatch, size // 2)  # the next save (the size of step-15) does not fit
    done = ckfolder.retain(tmp_path, 3, protect=(20,), need_bytes=size)
    assert on_disk(tmp_path) == {15: True, 10: True}  # step-5 alone makes room: step-10 stays
    assert [f.step for f, _ in done.by_room] == [5] and not done.by_count
    assert "could not hold the next save" in done.line() and "step-5" in done.line()
    free(monkeypatch, 0)
    ckfolder.retain(tmp_path, 3, need_bytes=ckfolder.folder_bytes(tmp_path / "step-10"))  # markers differ by bytes
    assert on_disk(tmp_path) == {15: True}  # the newest complete one is never removed


def test_room_that_removing_everything_cannot_make_removes_nothing(tmp_path, monkeypatch):
    for step in (5, 10):
        write_ckpt(tmp_path, step)
    size = ckfolder.folder_bytes(tmp_path / "step-10")
    free(monkeypatch, 0)
    done = ckfolder.retain(tmp_path, 2, need_bytes=3 * size)  # step-5 frees one size of three
    assert not done.removed and done.unsolved and on_disk(tmp_path) == {10: True, 5: True}
    assert "removed nothing for room" in done.line()


# --- the folder's peak (preflight) and the launcher's room check -----------------------------------


def test_peak_is_k_kept_plus_the_one_being_written_less_what_is_on_disk(tmp_path):
    est = 1000
    fresh = ckfolder.peak_room(tmp_path / "none", est, 2)
    assert (fresh.count, fresh.on_disk, fresh.needed_bytes, fresh.freeable_bytes) == (3, 0, 3 * est, 0)
    assert ckfolder.peak_room(tmp_path / "none", est, 0).needed_bytes == est  # keep all: the next one only
    for step in (5, 10, 15, 20):
        write_ckpt(tmp_path, step)
    size = ckfolder.folder_bytes(tmp_path / "step-20")  # larger than the estimate: it counts
    peak = ckfolder.peak_room(tmp_path, est, 2)
    assert (peak.checkpoint_bytes, peak.on_disk, peak.needed_bytes) == (size, 2, size)
    assert peak.freeable_bytes == ckfolder.folder_bytes(tmp_path / "step-5") + ckfolder.folder_bytes(
        tmp_path / "step-10"
    )


def test_launcher_counts_what_retention_frees_as_room(tmp_path, monkeypatch):
    for step in (5, 10, 15, 20):
        write_ckpt(tmp_path, step)
    free(monkeypatch, 10)
    ckfolder.check_writable(tmp_path, probe_bytes=0, keep_latest_k=2)  # step-5..15 can go: room enough
    with pytest.raises(UserError, match=r"GiB free but the last checkpoint took"):
        ckfolder.check_writable(tmp_path, probe_bytes=0)  # keep_latest_k 0: nothing is ever removed


# --- the manager: retention after every mark, a full disk as one UserError ---------------------------


def bare_manager(folder: Path, keep: int, monkeypatch) -> manager.RunaiCheckpointManager:
    """The attributes ``_mark`` / ``save`` use, without torchtitan's construction."""
    monkeypatch.setattr(manager, "data_record", lambda *a: {})
    m = manager.RunaiCheckpointManager.__new__(manager.RunaiCheckpointManager)
    m.folder, m.keep_latest_k, m.retiring, m.last_complete_step = str(folder), keep, None, -1
    m.job_config = SimpleNamespace(
        training=SimpleNamespace(steps=20),
        lr_scheduler=SimpleNamespace(
            warmup_steps=2, total_steps=None, decay_ratio=None, decay_type="linear", min_lr_factor=0.0
        ),
    )
    m.world_size = m.dp_degree = 2
    m.job_id, m.states, m.ledger = "job", {}, NullLedger()
    return m


def test_every_mark_retires_so_the_folder_keeps_at_most_k(tmp_path, monkeypatch):
    m = bare_manager(tmp_path, 2, monkeypatch)
    for step in (5, 7, 10, 13, 15, 20):  # interval, preemption and final saves all mark
        write_ckpt(tmp_path, step, mark=False)
        m._mark(step, "full")
        m._retire_wait()
        assert sum(on_disk(tmp_path).values()) <= 2
    assert on_disk(tmp_path) == {20: True, 15: True}
    m._purge_stale_checkpoints()  # torchtitan's purge is off: ours owns the rule
    assert on_disk(tmp_path) == {20: True, 15: True}


def test_a_preemption_at_an_already_marked_step_finishes_retention_before_it_returns(tmp_path, monkeypatch):
    """The signal lands while step 12's interval upload is in flight: ``save_now`` waits for it and
    marks it (the mark starts a retention pass on a thread), step 12 is then already complete, and
    the process leaves with os._exit: the pass must be done by then, or step 4 outlives it."""
    m = bare_manager(tmp_path, 2, monkeypatch)
    m.enable, m.load_only, m.save_future, m.busy = True, False, None, contextlib.nullcontext
    for step in (4, 8):
        write_ckpt(tmp_path, step)
    write_ckpt(tmp_path, 12, mark=False)  # uploaded, not yet marked
    m.pending_marker = (12, "full")
    real_retain = manager.retain

    def slow_retain(*a, **k):  # deleting tens of GB on a network volume takes a while
        time.sleep(0.5)
        return real_retain(*a, **k)

    monkeypatch.setattr(manager, "retain", slow_retain)
    line = m.save_now(12, time.monotonic())
    assert "already complete" in line and "step 12" in line
    assert on_disk(tmp_path) == {12: True, 8: True}  # no join after save_now: os._exit follows it


def test_make_room_before_a_save_frees_old_checkpoints(tmp_path, monkeypatch):
    m = bare_manager(tmp_path, 3, monkeypatch)
    for step in (5, 10, 15):
        write_ckpt(tmp_path, step)
    # the next save's size is the newest's: half a checkpoint more than step-5's, so step-5 alone
    # cannot make room and step-10 must go too (equal sizes left it to DCP's metadata, a few bytes apart)
    base = ckfolder.folder_bytes(tmp_path / "step-5")
    (tmp_path / "step-15" / "extra.bin").write_bytes(b"\0" * (base // 2))
    free(monkeypatch, 0)
    m._make_room(20)
    assert on_disk(tmp_path) == {15: True}


def test_a_full_disk_during_a_save_is_one_user_error_naming_the_folder_and_step(tmp_path, monkeypatch):
    told = tmp_path / "launcher" / "worker-error"
    told.parent.mkdir()
    monkeypatch.setenv(errors.WORKER_ERROR_ENV, str(told))
    write_ckpt(tmp_path, 5)
    partial = incomplete(tmp_path, 10)
    m = manager.RunaiCheckpointManager.__new__(manager.RunaiCheckpointManager)
    m.folder, m.last_complete_step = str(tmp_path), 5
    full = CheckpointException("save failed", {1: (OSError(28, "No space left on device"), None)})
    with pytest.raises(UserError) as info:
        with m._disk_full_is_a_user_error(10):
            raise full
    line = info.value.line()
    assert str(tmp_path) in line and "step 10" in line and "disk is full" in line
    assert "step 5) is intact" in line and "keep_latest_k" in line.split("Fix:")[1]
    assert not partial.exists() and on_disk(tmp_path) == {5: True}
    assert errors.reported(told).line() == line  # the launcher's last line, even after a SIGTERM
    errors.forget_report()  # the next worker group starts clean
    assert errors.reported(told) is None
    with pytest.raises(ValueError):  # anything else passes through untouched
        with m._disk_full_is_a_user_error(10):
            raise ValueError("not a disk problem")
    assert ckfolder.is_disk_full(OSError(28, "x")) and not ckfolder.is_disk_full(OSError(13, "x"))


REPO = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root for unshare -m")
def test_a_full_disk_in_any_writer_thread_fails_the_save_once_without_thread_tracebacks(tmp_path):
    """A real 1 MiB tmpfs (private mount namespace) and our 4-thread writer: DCP's extra writer
    threads would print a traceback each (threading.excepthook) and drop their error."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    snippet = (
        "import torch, torch.distributed.checkpoint as dcp\n"
        "from torchtitan_runai.checkpoint import folder\n"
        "from torchtitan_runai.training.checkpoint import upload\n"
        f"w = upload.writer('{mnt}/step-1', 4)\n"
        "try:\n"
        "    dcp.save({str(i): torch.ones(100_000) for i in range(8)}, storage_writer=w)\n"
        "except BaseException as e:\n"
        "    print('disk full:', folder.is_disk_full(e))\n"
    )
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f'mount -t tmpfs -o size=1m tmpfs {mnt} && exec "$0" -W ignore -c "$1"',
            sys.executable,
            snippet,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert "disk full: True" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Exception in thread" not in proc.stderr, proc.stderr[-3000:]


def test_a_failed_write_on_a_full_volume_is_a_full_disk_whatever_it_says(tmp_path, monkeypatch):
    # torch's zip writer reports a short write without errno: the preemption save's traceback
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert not ckfolder.is_disk_full(error)
    usage = SimpleNamespace(total=1 << 40, used=(1 << 40) - (8 << 20), free=8 << 20)
    monkeypatch.setattr(ckfolder.shutil, "disk_usage", lambda path: usage)
    assert ckfolder.is_disk_full(error, tmp_path / "checkpoint")  # the folder need not exist yet
    assert not ckfolder.is_disk_full(KeyboardInterrupt(), tmp_path)
    usage.free = 10 << 30
    assert not ckfolder.is_disk_full(error, tmp_path)
