"""A checkpoint folder on disk: its ``step-N`` folders, when one is complete, and writing safely.

A checkpoint folder (``<job.dump_folder>/<checkpoint.folder>``, ``storage.checkpoint_dir``) holds
torchtitan's ``step-N`` folders plus our files: ``step-N/.complete.json`` (below), ``job.json`` and
``lock.json`` (``checkpoint.ownership``).

``step-N/.complete.json`` is the completion marker. Rank 0 writes it (temp file, fsync, rename:
atomic, ``write_json_atomic``) after every rank's data is on disk: after a barrier that follows a
synchronous DCP save, or once an async save's upload has finished (DCP's coordinator writes
``.metadata`` only after gathering every rank's write results). It records the step, the kind
(``full`` or ``model-only``), world size and data-parallel degree, the schedule settings, the data
position's format and batch (``data``: what a resume on another node count keeps,
``checkpoint.resume.data_record``) and the size of every file.

When a checkpoint is complete (``examine``): its marker exists, ``.metadata`` is readable, and every
shard file is at least as long as DCP's metadata says (a truncated shard is caught here, not by a
bare ``EOFError`` mid-load). A folder without our marker (one written by stock torchtitan, e.g. the
seed's image on a user's PVC) is *adopted* when the same checks pass: DCP writes ``.metadata`` last,
by an atomic rename, after every rank's shards are written, so a readable ``.metadata`` with shards
of the lengths it lists is a finished save. Its kind comes from the keys: model weights, optimizer
state and train state make it ``full`` (resumable); weights alone ``model-only`` (complete, never
moved; continue from it with ``checkpoint.initial_load_path``). Its record is synthesised
(``adopted``, the data-parallel degree from its ``dataloader.dp_rank_*`` keys). Only a complete ``full`` one can be resumed (``StepFolder.resumable``);
a complete ``model-only`` one still holds the weights (the export reads it). Incomplete ones (a save
cut off by SIGKILL, a full disk, ...) are moved to ``.incomplete/`` (``quarantine``), never deleted.
Complete checkpoints are never moved or deleted here (torchtitan's ``keep_latest_k`` retires old
ones).

Whether the folder can take a checkpoint (``probe_writable``, ``lacks_room``): a real file is
written and removed (a read-only mount is caught even as root), and the free space must hold one
checkpoint. The launcher (``check_writable``: the last checkpoint's size) and preflight (the
estimate, 12 bytes per parameter) both use this one rule.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torchtitan_runai.errors import UserError
from torchtitan_runai.jsonio import read_json, write_json_atomic

MARKER = ".complete.json"
QUARANTINE = ".incomplete"
_STEP_RE = re.compile(r"^step-(\d+)$")
WRITE_ERRORS = {28: "the disk is full", 30: "it is on a read-only file system", 13: "permission denied"}


# ---------------------------------------------------------------------------------------------
# Completeness (the one rule: export, resume and the launcher all ask examine)


@dataclass(frozen=True)
class StepFolder:
    """One ``step-N`` folder and what we concluded about it."""

    step: int
    path: Path
    complete: bool
    why: str = ""
    record: dict | None = None

    @property
    def kind(self) -> str:
        return (self.record or {}).get("kind", "full")

    @property
    def resumable(self) -> bool:
        return self.complete and self.kind == "full"

    @property
    def adopted(self) -> bool:
        """Complete, but written without our marker (stock torchtitan)."""
        return bool((self.record or {}).get("adopted"))


def step_folders(folder: Path) -> list[tuple[int, Path]]:
    """``step-N`` folders directly in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in os.scandir(folder):
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), Path(entry.path)))
    return sorted(found, reverse=True)


def _read_metadata(path: Path) -> tuple[dict[str, int], set[str]]:
    """(file name -> bytes DCP's ``.metadata`` says it must hold, the saved keys); raises on an
    unreadable or empty ``.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    if metadata is None or not getattr(metadata, "state_dict_metadata", None):
        raise ValueError("no entries")
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    return needed, set(metadata.state_dict_metadata)


# torchtitan's CheckpointManager state names; the model's weights are saved flattened, unprefixed
NON_MODEL_PREFIXES = ("optimizer.", "lr_scheduler", "dataloader.", "train_state", "rng.")


def adopted_record(keys: set[str]) -> dict[str, Any]:
    """What a marker-less (stock) checkpoint holds, from its keys: ``full`` needs model weights,
    optimizer state and train state."""
    has_model = any(not k.startswith(NON_MODEL_PREFIXES) for k in keys)
    has_optimizer = any(k.startswith("optimizer.") for k in keys)
    has_train_state = any(k.startswith("train_state") for k in keys)
    dp = len({k.split(".")[1] for k in keys if k.startswith("dataloader.dp_rank_")})
    kind = "full" if has_model and has_optimizer and has_train_state else "model-only"
    return {"kind": kind, "adopted": True, "dp_degree": dp or None, "world_size": None,
            "has_model": has_model, "has_optimizer": has_optimizer, "has_train_state": has_train_state}


def examine(path: Path, step: int | None = None) -> StepFolder:
    """Is ``path`` (a ``step-N`` folder) a complete checkpoint? Cheap: sizes, no data read."""
    path = Path(path)
    if step is None:
        m = _STEP_RE.match(path.name)
        step = int(m.group(1)) if m else -1
    record = read_json(path / MARKER)
    if record is None and (path / MARKER).exists():
        return StepFolder(step, path, False, "unreadable completion marker")
    if not (path / ".metadata").is_file():
        if (path / "model.safetensors.index.json").is_file() or list(path.glob("*.safetensors")):
            # an HF-format final save: weights only
            return StepFolder(step, path, True, record=record or {"kind": "model-only", "adopted": True})
        if record is None:
            return StepFolder(step, path, False, "no completion marker and no .metadata (the save was cut off)")
        return StepFolder(step, path, False, "no .metadata", record)
    try:
        needed, keys = _read_metadata(path)
    except Exception as e:  # any unpickling error means the same thing: unusable
        return StepFolder(step, path, False, f".metadata unreadable ({type(e).__name__})", record)
    if record is None:
        record = adopted_record(keys)
    recorded = record.get("files", {})
    for name, size in {**recorded, **needed}.items():
        file = path / name
        if not file.is_file():
            return StepFolder(step, path, False, f"shard {name} is missing", record)
        actual = file.stat().st_size
        want = max(needed.get(name, 0), recorded.get(name, 0))
        if actual < want:
            return StepFolder(step, path, False, f"shard {name} is truncated ({actual} of {want} bytes)", record)
    return StepFolder(step, path, True, record=record)


def scan(folder: Path) -> list[StepFolder]:
    """Every ``step-N`` folder, newest first, with its verdict."""
    return [examine(path, step) for step, path in step_folders(folder)]


def newest_resumable(found: list[StepFolder]) -> StepFolder | None:
    return next((f for f in found if f.resumable), None)


def quarantine(found: StepFolder, folder: Path) -> Path:
    """Move an incomplete checkpoint aside (never delete: someone may want to look at it)."""
    assert not found.complete, "complete checkpoints are never moved"
    target_dir = Path(folder) / QUARANTINE
    target_dir.mkdir(exist_ok=True)
    target = target_dir / f"{found.path.name}.{time.strftime('%Y%m%d-%H%M%S')}.{uuid.uuid4().hex[:6]}"
    os.replace(found.path, target)
    return target


def marker_record(step: int, kind: str, path: Path, schedule: Mapping[str, Any], world_size: int,
                  dp_degree: int, job_id: str | None) -> dict[str, Any]:
    """The completion marker's content for the ``step-N`` folder ``path`` (see the module docstring)."""
    files = {
        p.name: p.stat().st_size
        for p in Path(path).iterdir()
        if p.is_file() and not p.name.startswith(f".{MARKER}") and p.name != MARKER
    }
    return {
        "step": step,
        "kind": kind,
        "world_size": world_size,
        "dp_degree": dp_degree,
        "schedule": dict(schedule),
        "job": job_id,
        "time": time.time(),
        "host": socket.gethostname(),
        "files": files,
    }


def mark_complete(path: Path, record: Mapping[str, Any]) -> None:
    write_json_atomic(Path(path) / MARKER, record)



# ---------------------------------------------------------------------------------------------
# Room for a checkpoint: one rule for the launcher and preflight


def probe_writable(folder: Path, nbytes: int = 0) -> None:
    """Write ``nbytes`` to a probe file in the existing ``folder`` (fsync), then remove it; OSError if that fails."""
    probe = Path(folder) / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * nbytes)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if probe.exists():
            probe.unlink()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def lacks_room(folder: Path, needed_bytes: int) -> int | None:
    """The free bytes at ``folder`` when they are fewer than one checkpoint (``needed_bytes``), else None."""
    free = shutil.disk_usage(folder).free
    return free if free < needed_bytes else None


def check_writable(folder: Path, probe_bytes: int = 1 << 20, create: bool = True) -> None:
    """Create the folder and write (then remove) a probe file; UserError if that fails.

    ``create=False`` (the launcher's checks, before the folder is claimed): a missing folder stays
    missing and the nearest existing folder above it is probed instead.
    """
    folder = Path(folder)
    setting = "checkpoint.folder"
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        where = folder
        while not where.exists() and where != where.parent:
            where = where.parent
        probe_writable(where, probe_bytes)
    except OSError as e:
        reason = WRITE_ERRORS.get(e.errno, e.strerror or str(e))
        raise UserError(setting, str(folder), f"cannot write a checkpoint there ({reason})",
                        "mount a writable volume with room for checkpoints (e.g. a PVC) at that path, or set "
                        "job.dump_folder / checkpoint.folder to one")
    newest = next(iter(step_folders(folder)), None)
    if newest is not None:
        size = folder_bytes(newest[1])
        free = lacks_room(folder, size)
        if free is not None:
            raise UserError(setting, str(folder),
                            f"only {free / 2**30:.2f} GiB free but the last checkpoint took {size / 2**30:.2f} GiB",
                            "free space (lower checkpoint.keep_latest_k, delete old step-N folders) or grow the volume")
