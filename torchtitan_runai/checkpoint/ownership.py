"""Who may use a checkpoint folder: the job that owns it, the process running in it, every rank seeing it.

``job.json`` records the job that owns the folder: ``JOB_UUID`` (Run:ai), else ``JOB_NAME``, else an
id chosen at first start (``claim_folder``). A different job gets a clear error (exit 2) and the
override, ``--resilience.take_over_folder``. ``lock.json`` records who runs in the folder now (host,
pid, time); a restart of the same job, including after ``kill -9``, simply takes it over.

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
from typing import Callable, Mapping

from torchtitan_runai.checkpoint.folder import read_json, write_json_atomic
from torchtitan_runai.errors import UserError

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
                "checkpoint.folder", str(folder),
                f"belongs to another job ({recorded_source}={recorded}{seen}); this is {this}, and sharing a "
                "folder would overwrite each other's checkpoints",
                "give this job its own job.dump_folder or checkpoint.folder, or, to continue that job's run on "
                "purpose, add --resilience.take_over_folder")
        if same:
            job_id = recorded
    if not write:
        return job_id or (owner or {}).get("job") or ""
    folder.mkdir(parents=True, exist_ok=True)
    if owner is None or take_over and owner.get("job") != job_id:
        if job_id is None:
            job_id, source = f"chosen-{uuid.uuid4().hex[:12]}", "chosen"
        write_json_atomic(folder / OWNER, {"job": job_id, "source": source, "created": time.time(),
                                           "host": socket.gethostname(), "previous": owner})
    write_json_atomic(folder / LOCK, {"job": job_id, "host": socket.gethostname(), "pid": os.getpid(),
                                      "time": time.time()})
    return job_id


# ---------------------------------------------------------------------------------------------
# Shared storage across ranks

MARKER_NAME = ".runai-shared-folder"


def _torch_broadcast(value: str | None) -> str:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def confirm_shared_folder(folder: str | os.PathLike, rank: int, world_size: int, job_key: str,
                          timeout: float = 30.0, broadcast: Callable[[str | None], str] | None = None,
                          poll: float = 0.2) -> None:
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
            "checkpoint folder (OUTPUT_DIR)", str(folder),
            f"rank {rank} does not see the marker rank 0 wrote there ({marker} {what}): the ranks write to "
            "different disks, so checkpoints could never be resumed",
            "for a multi-node job, mount one shared ReadWriteMany PVC at OUTPUT_DIR on every pod "
            "(not emptyDir, hostPath or a ReadWriteOnce volume)",
        )
