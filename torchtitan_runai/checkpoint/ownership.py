"""Who may use a checkpoint folder: the job that owns it, the process running in it, every rank seeing it.

``job.json`` records the job that owns the folder: ``JOB_UUID`` (Run:ai), else ``JOB_NAME``, else an
id chosen at first start (``claim_folder``). A different job gets a clear error (exit 2) and the
override, ``--resilience.take_over_folder``.

``lock.json`` records the run in the folder now (host, kernel boot id, pid namespace, pid and its
start time, and a heartbeat the launcher refreshes every ``LOCK_HEARTBEAT_S``). The launcher takes
it with ``hold_folder`` once every check has passed (``acquire_lock``: created with a hard link, so
of two runs starting together exactly one gets it) and removes it at the end. A second run is
refused (exit 2, naming the folder and the holder) while the holder lives: on this machine, its pid
exists with the same start time, or any process of its run does (its workers and their writing
processes; ``lifetime``); elsewhere, its heartbeat is newer than ``LOCK_STALE_S``. A lock whose
holder is gone (``kill -9``, a crashed node, an earlier container of the same pod) is taken over,
even by the same job without ``JOB_UUID``/``JOB_NAME``.

After ``kill -9`` of the launcher its workers and their writing processes stop within seconds (the
kernel's parent-death signal, ``lifetime``). A rerun on this machine that comes sooner waits for
them, up to ``SURVIVOR_WAIT_S``, and is refused if any is still there, naming them: it never writes
beside a survivor. On another machine the launcher's heartbeat covers them: it is stale only
``LOCK_STALE_S`` after the launcher's death, long after its workers stopped.

``confirm_shared_folder(folder, rank, world_size, job_key)`` runs on every rank at start: rank 0
writes a marker with a random nonce into the checkpoint folder, the nonce is broadcast, and every
other rank reads the marker and compares. A node-local folder (``emptyDir``, ``hostPath``) or a
ReadWriteOnce volume on a multi-node job is then one clear error at start instead of checkpoints
that no restart can resume.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from torchtitan_runai import storage
from torchtitan_runai.checkpoint.folder import check_writable
from torchtitan_runai.errors import UserError
from torchtitan_runai.jsonio import read_json, write_json_atomic
from torchtitan_runai.lifetime import processes_of
from torchtitan_runai.lifetime import start_ticks as _start_ticks

OWNER = "job.json"
LOCK = "lock.json"


# ---------------------------------------------------------------------------------------------
# Job identity and lock


def job_identity(env: Mapping[str, str]) -> tuple[str | None, str]:
    """(id, where it came from): Run:ai's JOB_UUID, else JOB_NAME, else (None, 'none')."""
    for name in ("JOB_UUID", "JOB_NAME"):
        if env.get(name):
            return env[name], name
    return None, "none"


def claim_folder(folder: Path, env: Mapping[str, str], take_over: bool = False, write: bool = True) -> str:
    """Check that ``folder`` belongs to this job (recording it at first start); return the job id.

    Raises UserError when another job owns it, unless ``take_over``.
    """
    folder = Path(folder)
    job_id, source = job_identity(env)
    owner = read_json(folder / OWNER)
    if owner is not None:
        recorded, recorded_source = owner.get("job"), owner.get("source")
        same = recorded == job_id or (job_id is None and recorded_source == "chosen")
        if not same and not take_over:
            lock = read_json(folder / LOCK) or {}
            last = lock.get("time")
            seen = f", last started on {lock.get('host')} {time.time() - last:.0f}s ago" if last else ""
            this = f"{source}={job_id}" if job_id else "a job without JOB_UUID/JOB_NAME"
            raise UserError(
                "checkpoint.folder",
                str(folder),
                f"belongs to another job ({recorded_source}={recorded}{seen}); this is {this}, and sharing a "
                "folder would overwrite each other's checkpoints",
                "give this job its own job.dump_folder or checkpoint.folder, or, to continue that job's run on "
                "purpose, add --resilience.take_over_folder",
            )
        if same:
            job_id = recorded
    if not write:
        return job_id or (owner or {}).get("job") or ""
    folder.mkdir(parents=True, exist_ok=True)
    if owner is None or take_over and owner.get("job") != job_id:
        if job_id is None:
            job_id, source = f"chosen-{uuid.uuid4().hex[:12]}", "chosen"
        write_json_atomic(
            folder / OWNER,
            {"job": job_id, "source": source, "created": time.time(), "host": socket.gethostname(), "previous": owner},
        )
    return job_id


# ---------------------------------------------------------------------------------------------
# The lock: one live launcher per folder

LOCK_HEARTBEAT_S = 10.0
"""How often the launcher that holds the folder refreshes the heartbeat in lock.json."""

LOCK_STALE_S = 60.0
"""A lock whose heartbeat is older than this (and whose holder is not a live process on this
machine) belongs to a run that is gone: it is taken over."""

_SURVIVORS = "of its processes on this machine still run"

SURVIVOR_WAIT_S = 30.0
"""How long a new run waits for the processes of a killed launcher's run to stop (they get the
parent-death signal, ``lifetime``: normally well under a second; a process in an uninterruptible
write on a network volume stops when the write returns) before it refuses the folder."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def lock_record(job_id: str | None) -> dict:
    pid = os.getpid()
    now = time.time()
    return {
        "job": job_id,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid_ns": _pid_namespace(),
        "pid": pid,
        "pid_start": _start_ticks(pid),
        "time": now,
        "heartbeat": now,
    }


def holder_alive(lock: Mapping, now: float | None = None, wait_s: float = 0.0) -> tuple[bool, str]:
    """Is the run that wrote ``lock`` still running? (alive, how we know).

    - Same kernel and pid namespace (two launches on one machine or in one container): its pid
      exists with the same start time, or, its launcher gone, a process of its run is still alive
      (``lifetime.processes_of``: its workers and their writing processes, which carry the
      launcher's mark). They stop within seconds of their launcher (the parent-death signal,
      ``lifetime``): ``wait_s`` seconds are given to them before the run counts as alive.
    - Same host name, other pid namespace: an earlier container of this same pod (a pod's name
      is its host name, and a pod runs one container of it at a time; the processes of a container
      end with it): gone.
    - Elsewhere (another pod, another ``docker run``): its heartbeat is newer than LOCK_STALE_S.
      The launcher beats; its workers stop within seconds of it, long before the heartbeat is
      stale, so the launcher's heartbeat covers every process of the run that can write.
    """
    now = time.time() if now is None else now
    pid = lock.get("pid")
    local = lock.get("boot_id") == _boot_id() and lock.get("pid_ns") == _pid_namespace() and _boot_id()
    if local and isinstance(pid, int):
        if pid == os.getpid():
            return False, "this process"
        start = _start_ticks(pid)
        alive = start is not None and lock.get("pid_start") in (None, start)
        if alive or not lock.get("pid_start"):
            return alive, f"pid {pid} on this machine is {'running' if alive else 'gone'}"
        mark = f"{pid} {lock['pid_start']}"
        deadline = time.monotonic() + wait_s
        left = processes_of(mark)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = processes_of(mark)
        if left:
            return True, (
                f"its launcher, pid {pid}, is gone, but {len(left)} {_SURVIVORS}: pids {' '.join(map(str, left))}"
            )
        return False, f"pid {pid} on this machine is gone"
    if lock.get("host") == socket.gethostname():
        return False, "an earlier container of this pod"
    age = now - float(lock.get("heartbeat") or lock.get("time") or 0)
    return age < LOCK_STALE_S, f"its heartbeat is {age:.0f}s old"


def _refuse(folder: Path, lock: Mapping, how: str) -> UserError:
    if _SURVIVORS in how:
        pids = how.rsplit("pids ", 1)[1]
        return UserError(
            "checkpoint.folder",
            str(folder),
            f"the processes of a run whose launcher was killed are still running after {SURVIVOR_WAIT_S:.0f}s "
            f"(host {lock.get('host')}; {how}), and two runs would overwrite each other's checkpoints",
            f"stop them (kill -9 {pids}), then run again; it resumes from the newest complete checkpoint",
        )
    return UserError(
        "checkpoint.folder",
        str(folder),
        f"another run is training in this folder now (host {lock.get('host')}, pid {lock.get('pid')}; {how}), "
        "and two runs would overwrite each other's checkpoints",
        "wait for it to finish or stop it, or give this run its own job.dump_folder (or OUTPUT_DIR); a lock "
        f"left by a run on another machine that is gone is taken over {LOCK_STALE_S:.0f}s after its last "
        "heartbeat, or at once with --resilience.take_over_folder",
    )


def acquire_lock(folder: Path, job_id: str | None, take_over: bool = False) -> dict:
    """Write lock.json for this process, unless a live run holds it (UserError naming it).

    The lock file is created with a hard link, which fails when the file exists, so of two runs
    starting together exactly one wins; the other then finds a live holder.
    """
    folder = Path(folder)
    path = folder / LOCK
    record = lock_record(job_id)
    for _ in range(10):
        current = read_json(path)
        if current is not None:
            alive, how = holder_alive(current, wait_s=SURVIVOR_WAIT_S)
            # take_over cannot beat a live process on this machine, only a heartbeat elsewhere
            if alive and not (take_over and how.startswith("its heartbeat")):
                raise _refuse(folder, current, how)
            stale = path.with_name(f".{LOCK}.stale-{os.getpid()}")
            try:
                os.replace(path, stale)
            except FileNotFoundError:
                continue  # another run just took it over: look again
            if read_json(stale) != current:  # we moved a newer lock than the one we judged
                try:
                    os.link(stale, path)
                except FileExistsError:
                    pass
                stale.unlink(missing_ok=True)
                continue
            stale.unlink(missing_ok=True)
        elif path.exists():  # present but unreadable (half-written by a run that died): stale
            path.unlink(missing_ok=True)
            continue
        tmp = path.with_name(f".{LOCK}.new-{os.getpid()}")
        write_json_atomic(tmp, record)
        try:
            os.link(tmp, path)
            return record
        except FileExistsError:
            continue
        finally:
            tmp.unlink(missing_ok=True)
    raise UserError(
        "checkpoint.folder",
        str(folder),
        "could not take the folder's lock (it kept changing)",
        "check that no other run uses this folder, then retry",
    )


class FolderLock:
    """The launcher's hold on a checkpoint folder for the whole run: heartbeat, then release."""

    def __init__(self, folder: Path, record: dict, interval: float = LOCK_HEARTBEAT_S):
        import threading

        self.path = Path(folder) / LOCK
        self.record = dict(record)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="folder-lock-heartbeat", daemon=True)
        self._thread.start()

    def _mine(self) -> bool:
        current = read_json(self.path) or {}
        return current.get("pid") == self.record["pid"] and current.get("boot_id") == self.record["boot_id"]

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if not self._mine():
                return  # taken over on purpose (--resilience.take_over_folder): stop writing
            self.record["heartbeat"] = time.time()
            try:
                write_json_atomic(self.path, self.record)
            except OSError:
                pass  # a full or flaky volume: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._mine():
            self.path.unlink(missing_ok=True)


def hold_folder(config: Any, env: Mapping[str, str]) -> FolderLock | None:
    """The launcher's claim, once every check has passed: a writable folder, its lock (refused
    while another run is live in it), and its owner record (job.json at first start)."""
    if not config.checkpoint.enable:
        return None
    folder = storage.checkpoint_dir(config)
    take_over = config.resilience.take_over_folder
    check_writable(folder, keep_latest_k=getattr(config.checkpoint, "keep_latest_k", 0))
    record = acquire_lock(folder, job_identity(env)[0], take_over=take_over)
    hold = FolderLock(folder, record)
    try:
        hold.record["job"] = claim_folder(folder, env, take_over=take_over, write=True)
    except BaseException:
        hold.release()
        raise
    return hold


# ---------------------------------------------------------------------------------------------
# Shared storage across ranks

MARKER_NAME = ".runai-shared-folder"


def _torch_broadcast(value: str | None) -> str:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def confirm_shared_folder(
    folder: str | os.PathLike,
    rank: int,
    world_size: int,
    job_key: str,
    timeout: float = 30.0,
    broadcast: Callable[[str | None], str] | None = None,
    poll: float = 0.2,
) -> None:
    """Every rank sees the checkpoint folder rank 0 writes to, or a UserError (see module doc).

    ``broadcast(value)`` sends rank 0's value to every rank and returns it (it is also the barrier
    after rank 0's write); default: ``torch.distributed.broadcast_object_list`` (the process group
    must be initialized). The others re-read for up to ``timeout`` seconds (NFS attribute caches).
    """
    if world_size <= 1:
        return
    folder = Path(folder)
    marker = folder / MARKER_NAME
    broadcast = broadcast or _torch_broadcast
    nonce = None
    if rank == 0:
        nonce = f"{job_key} {secrets.token_hex(16)}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{MARKER_NAME}.{os.getpid()}.tmp"
        tmp.write_text(nonce)
        os.replace(tmp, marker)
    nonce = broadcast(nonce)
    if rank == 0:
        return
    deadline = time.monotonic() + timeout
    seen = None
    while True:
        try:
            seen = marker.read_text()
        except OSError:
            seen = None
        if seen == nonce or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    if seen != nonce:
        what = "does not exist here" if seen is None else "holds another job's or an older marker"
        raise UserError(
            "checkpoint folder (OUTPUT_DIR)",
            str(folder),
            f"rank {rank} does not see the marker rank 0 wrote there ({marker} {what}): the ranks write to "
            "different disks, so checkpoints could never be resumed",
            "for a multi-node job, mount one shared ReadWriteMany PVC at OUTPUT_DIR on every pod "
            "(not emptyDir, hostPath or a ReadWriteOnce volume)",
        )
