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
(``adopted``, the data-parallel degree from its ``dataloader.dp_rank_*`` keys). Only a complete ``full`` one can be
resumed (``StepFolder.resumable``);
a complete ``model-only`` one still holds the weights (the export reads it). Incomplete ones newer
than the checkpoint a run resumes from (a save cut off by SIGKILL, ...) are moved to ``.incomplete/``
(``quarantine``) at start, never deleted there. Complete checkpoints are never moved.

Retention (``retain``, the one rule; the manager applies it, torchtitan's own purge is off): with
``checkpoint.keep_latest_k = k > 0`` the folder keeps at most k *complete* checkpoints, whatever wrote
them (interval, preemption, final save). It runs after every save is marked complete and, with the
size the next save needs, before every save:

- by count: the complete checkpoints beyond the newest k go, oldest first; so do incomplete
  ``step-N`` folders older than the newest complete checkpoint (cut-off saves nothing resumes from);
- by room: when the free space (plus what the count frees) cannot hold the next save (the size of
  the newest complete checkpoint), the oldest remaining folders go, oldest first, until it can. When
  even removing all of them would not make room, nothing is removed (the save would fail anyway,
  and the checkpoints are worth more than the attempt);
- never removed: the newest complete checkpoint and the newest resumable one, the folders the
  caller names (``protect``: the save being written), and an incomplete folder that something wrote
  into during the last ``LIVE_WRITE_S`` seconds (a writer may still be using it).

A folder is removed whole or not at all (``remove``): renamed to ``.removing-step-N.<id>`` first,
then deleted; a removal cut off (the trainer leaves with ``os._exit``, a SIGKILL) is finished by the
next ``retain``, never left as a ``step-N`` folder with ``.metadata`` and part of its shards.

So the folder peaks at k complete checkpoints plus the one being written (the manager waits for the
upload in flight, marks it and retires before it stages the next save): ``peak_room``. k = 0 keeps
every checkpoint, and nothing is ever removed.

Whether the folder can take a checkpoint (``probe_writable``, ``lacks_room``): a real file is
written and removed (a read-only mount is caught even as root), and the free space must hold what
comes next. The launcher (``check_writable``: the last checkpoint's size, counting what retention
may free first) and preflight (``peak_room``: the folder's peak, the estimate of 12 bytes per
parameter for a checkpoint) both ask here. ``is_disk_full`` finds ENOSPC inside what a failed save
raised (DCP wraps every rank's error in a ``CheckpointException``).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping

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
    return {
        "kind": kind,
        "adopted": True,
        "dp_degree": dp or None,
        "world_size": None,
        "has_model": has_model,
        "has_optimizer": has_optimizer,
        "has_train_state": has_train_state,
    }


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


def _is_step_folder(path: Path) -> bool:
    return bool(_STEP_RE.match(path.name)) and ((path / ".metadata").is_file() or (path / MARKER).is_file())


def checkpoint_around(path: Path, depth: int = 3) -> Path | None:
    """The checkpoint a write to ``path`` would land in or replace: a step folder (``step-N`` with
    DCP's ``.metadata`` or our marker) that is ``path`` or holds it, a folder of step folders that
    is or holds it, or a step folder up to ``depth`` levels below it (a dump folder holds
    ``<checkpoint.folder>/step-N``). None where a command may write. No command writes there:
    the export refuses such a destination (``hf.export.export_checkpoint``)."""
    path = Path(path).resolve()
    for above in (path, *path.parents):
        if not above.is_dir():
            continue
        if _is_step_folder(above):
            return above
        try:
            if any(_is_step_folder(child) for child in above.iterdir() if child.is_dir()):
                return above
        except OSError:  # an unreadable parent holds nothing we could replace
            continue
    level = [path] if path.is_dir() else []
    for _ in range(depth):
        below: list[Path] = []
        for folder in level:
            try:
                below += [child for child in folder.iterdir() if child.is_dir() and not child.is_symlink()]
            except OSError:
                continue
        found = next((child for child in below if _is_step_folder(child)), None)
        if found is not None:
            return found
        level = below
    return None


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


def marker_record(
    step: int, kind: str, path: Path, schedule: Mapping[str, Any], world_size: int, dp_degree: int, job_id: str | None
) -> dict[str, Any]:
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
# Retention: which step folders go (see the module docstring; ``retain`` applies it)

LIVE_WRITE_S = 120.0
"""An incomplete folder written into more recently than this may have a live writer: never removed."""


def _last_write(path: Path) -> float:
    """The newest mtime of the folder and the files directly in it (DCP writes no subfolders)."""
    newest = 0.0
    try:
        newest = path.stat().st_mtime
        for entry in os.scandir(path):
            try:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            except OSError:
                continue
    except OSError:
        pass
    return newest


def _untouchable(found: list[StepFolder], protect: Collection[int], now: float) -> set[int]:
    """Steps that no rule removes: the newest complete and newest resumable checkpoints, the
    protected steps and incomplete folders with a possible live writer."""
    keep = set(protect)
    complete = [f for f in found if f.complete]
    if complete:
        keep.add(complete[0].step)
    resumable = newest_resumable(found)
    if resumable is not None:
        keep.add(resumable.step)
    keep.update(f.step for f in found if not f.complete and now - _last_write(f.path) < LIVE_WRITE_S)
    return keep


def over_count(
    found: list[StepFolder], keep_latest_k: int, protect: Collection[int] = (), now: float | None = None
) -> list[StepFolder]:
    """The folders the count rule removes (oldest first) from ``found`` (``scan``'s list)."""
    if keep_latest_k <= 0:
        return []
    now = time.time() if now is None else now
    spared = _untouchable(found, protect, now)
    complete = [f for f in found if f.complete]  # newest first
    kept = {f.step for f in complete if f.step in spared}
    for f in complete:
        if len(kept) >= keep_latest_k:
            break
        kept.add(f.step)
    newest_complete = complete[0].step if complete else None
    doomed = [
        f
        for f in found
        if f.step not in spared
        and (
            (f.complete and f.step not in kept)
            or (not f.complete and newest_complete is not None and f.step < newest_complete)
        )
    ]
    return sorted(doomed, key=lambda f: f.step)


def for_room(
    found: list[StepFolder],
    short_bytes: int,
    sizes: Mapping[int, int],
    protect: Collection[int] = (),
    now: float | None = None,
) -> list[StepFolder]:
    """The folders the room rule removes (oldest first) to free ``short_bytes``; [] when even all of
    them would not."""
    if short_bytes <= 0:
        return []
    now = time.time() if now is None else now
    spared = _untouchable(found, protect, now)
    chosen, freed = [], 0
    for f in sorted((f for f in found if f.step not in spared), key=lambda f: f.step):
        chosen.append(f)
        freed += sizes.get(f.step, 0)
        if freed >= short_bytes:
            return chosen
    return []


@dataclass
class Retired:
    """What one ``retain`` pass removed, and why: ``line()`` is the one log line (None: nothing)."""

    folder: Path
    keep_latest_k: int
    by_count: list[tuple[StepFolder, int]]
    by_room: list[tuple[StepFolder, int]]
    kept: list[int]
    need_bytes: int = 0
    free_bytes: int | None = None
    short_bytes: int = 0  # the room still missing after the count rule
    unsolved: bool = False  # room was short and removing every candidate would not have fixed it
    failed: list[str] | None = None

    @property
    def removed(self) -> list[StepFolder]:
        return [f for f, _ in self.by_count + self.by_room]

    def line(self) -> str | None:
        if not self.removed and not self.unsolved:
            return None
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        what = lambda items: ", ".join(  # noqa: E731
            f"{f.path.name} ({gib(n)}{'' if f.complete else ', incomplete'})" for f, n in items
        )
        kept = ", ".join(f"step-{s}" for s in self.kept) or "none"
        parts = []
        if self.by_count:
            parts.append(
                f"removed {what(self.by_count)}: beyond the newest {self.keep_latest_k} complete checkpoint(s)"
            )
        if self.by_room:
            parts.append(
                f"removed {what(self.by_room)}, oldest first: {gib(self.free_bytes or 0)} free could not "
                f"hold the next save (~{gib(self.need_bytes)}, the size of the newest complete checkpoint)"
            )
        if self.unsolved:
            parts.append(
                f"{gib(self.free_bytes or 0)} free cannot hold the next save (~{gib(self.need_bytes)}) even "
                "without every older checkpoint: removed nothing for room (the save may fail; free space "
                "or grow the volume)"
            )
        if self.failed:
            parts.append(f"could not remove {', '.join(self.failed)}")
        return (
            f"checkpoint retention in {self.folder} (checkpoint.keep_latest_k = {self.keep_latest_k}): "
            f"{'; '.join(parts)}; kept complete {kept}"
        )


REMOVING = ".removing-"
"""A step folder being removed is renamed to ``.removing-step-N.<id>`` first (``remove``)."""


def remove(path: Path) -> None:
    """Remove a step folder so that no one ever sees part of it: rename it out of the ``step-N``
    namespace (atomic), then delete it. A removal cut off (the process leaves with ``os._exit``, a
    SIGKILL) leaves a ``.removing-*`` folder, swept by the next ``retain``, never a ``step-N`` folder
    with ``.metadata`` and some of its shards (incomplete and just written into, so spared
    ``LIVE_WRITE_S`` and counted by anyone who counts ``step-*/.metadata``)."""
    path = Path(path)
    doomed = path.parent / f"{REMOVING}{path.name}.{uuid.uuid4().hex[:6]}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _sweep_removals(folder: Path) -> None:
    """Finish removals an earlier pass began and was cut off in (``remove``)."""
    for entry in folder.glob(f"{REMOVING}*"):
        shutil.rmtree(entry, ignore_errors=True)


def retain(
    folder: Path,
    keep_latest_k: int,
    protect: Collection[int] = (),
    need_bytes: int = 0,
    found: list[StepFolder] | None = None,
) -> Retired:
    """Apply the retention rule to ``folder`` now (see the module docstring): the count rule, and
    with ``need_bytes`` (the next save's size) the room rule. Removes synchronously; only the
    process that owns the folder (rank 0) calls it. ``keep_latest_k = 0`` removes nothing."""
    folder = Path(folder)
    found = scan(folder) if found is None else found
    now = time.time()
    result = Retired(folder, keep_latest_k, [], [], [], need_bytes=need_bytes)
    if keep_latest_k > 0:
        _sweep_removals(folder)
        sizes = {f.step: folder_bytes(f.path) for f in found}
        result.by_count = [(f, sizes[f.step]) for f in over_count(found, keep_latest_k, protect, now)]
        rest = [f for f in found if f not in result.removed]
        if need_bytes > 0:
            result.free_bytes = shutil.disk_usage(folder).free + sum(n for _, n in result.by_count)
            result.short_bytes = need_bytes - result.free_bytes
            if result.short_bytes > 0:
                result.by_room = [(f, sizes[f.step]) for f in for_room(rest, result.short_bytes, sizes, protect, now)]
                result.unsolved = not result.by_room
        failed = []
        for f in result.removed:
            try:
                remove(f.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                failed.append(f"{f.path.name} ({e.strerror or e})")
        result.failed = failed or None
    result.kept = [f.step for f in found if f.complete and f not in result.removed]
    return result


@dataclass(frozen=True)
class Peak:
    """The most a checkpoint folder holds at once, and what it still needs (``peak_room``)."""

    checkpoint_bytes: int  # one checkpoint: the estimate, or the newest complete one on disk if larger
    count: int  # checkpoints at the peak: keep_latest_k kept + 1 being written (1 with keep_latest_k = 0)
    on_disk: int  # of them, complete checkpoints already in the folder that retention keeps
    needed_bytes: int  # free bytes the peak still needs: (count - on_disk) checkpoints
    freeable_bytes: int  # what the count rule removes before the next save is written


def peak_room(folder: Path, estimate_bytes: int, keep_latest_k: int) -> Peak:
    """The folder's peak (see the module docstring): k complete checkpoints plus the one being
    written, since the manager waits for the upload in flight, marks it and retires before it writes
    the next save (no second one is ever in flight). The newest complete checkpoints on disk (up to
    k) are part of it; the other step folders are what the count rule frees. ``keep_latest_k = 0``
    keeps every checkpoint: the peak has no bound, and this asks for room for the next one only."""
    found = scan(folder)
    newest = next((f for f in found if f.complete), None)
    size = max(estimate_bytes, folder_bytes(newest.path) if newest is not None else 0)
    if keep_latest_k <= 0:
        return Peak(size, 1, 0, size, 0)
    doomed = over_count(found, keep_latest_k)
    on_disk = min(keep_latest_k, sum(1 for f in found if f.complete and f not in doomed))
    count = keep_latest_k + 1
    return Peak(size, count, on_disk, (count - on_disk) * size, sum(folder_bytes(f.path) for f in doomed))


def existing_ancestor(path: Path) -> Path:
    """``path``, or its nearest parent that exists (where a folder not created yet will be)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


FULL_VOLUME_BYTES = 64 << 20
"""A save that failed on a volume with less than this free failed for lack of room, whatever it
says: torch's zip writer reports a short write as ``RuntimeError: [enforce fail at
inline_container.cc] ... unexpected pos``, with no errno."""


def is_disk_full(error: BaseException, folder: Path | None = None) -> bool:
    """Is ENOSPC anywhere in ``error``: its causes, or the per-rank errors of DCP's
    ``CheckpointException`` (an upload's error comes back from DCP's saving process pickled)? With
    ``folder``, also any failed write while the volume holding it has less than ``FULL_VOLUME_BYTES``
    free."""
    if folder is not None and not isinstance(error, (KeyboardInterrupt, SystemExit)):
        try:
            if shutil.disk_usage(existing_ancestor(folder)).free < FULL_VOLUME_BYTES:
                return True
        except OSError:
            pass
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e.args[0] if len(e.args) == 1 else e.args):
            return True
        failures = getattr(e, "failures", None)
        if isinstance(failures, Mapping):
            todo.extend(v[0] if isinstance(v, tuple) and v else v for v in failures.values())
        todo.extend((e.__cause__, e.__context__))
    return False


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


def check_writable(folder: Path, probe_bytes: int = 1 << 20, create: bool = True, keep_latest_k: int = 0) -> None:
    """Create the folder and write (then remove) a probe file; UserError if that fails.

    ``create=False`` (the launcher's checks, before the folder is claimed): a missing folder stays
    missing and the nearest existing folder above it is probed instead. With ``keep_latest_k > 0``
    the room retention would free before the next save (every step folder but the newest complete
    and resumable ones) counts as free: the trainer frees it before it writes.
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
        raise UserError(
            setting,
            str(folder),
            f"cannot write a checkpoint there ({reason})",
            "mount a writable volume with room for checkpoints (e.g. a PVC) at that path, or set "
            "job.dump_folder / checkpoint.folder to one",
        )
    newest = next(iter(step_folders(folder)), None)
    if newest is not None:
        size = folder_bytes(newest[1])
        free = lacks_room(folder, size)
        freeable = 0
        if free is not None and keep_latest_k > 0:
            found = scan(folder)
            spared = _untouchable(found, (), time.time())
            freeable = sum(folder_bytes(f.path) for f in found if f.step not in spared)
        if free is not None and free + freeable < size:
            also = f" (retention can free {freeable / 2**30:.2f} GiB more)" if freeable else ""
            raise UserError(
                setting,
                str(folder),
                f"only {free / 2**30:.2f} GiB free{also} but the last checkpoint took {size / 2**30:.2f} GiB",
                "free space (lower checkpoint.keep_latest_k, delete old step-N folders) or grow the volume",
            )
