"""Which checkpoint a job resumes from, and whether a checkpoint folder is safe to use.

A checkpoint folder (``<job.dump_folder>/<checkpoint.folder>``, e.g. on a PVC) holds torchtitan's
``step-N`` folders plus three files of ours:

``step-N/.complete.json``  the completion marker. Rank 0 writes it (temp file, fsync, rename: atomic)
                           after every rank's data is on disk: after a barrier that follows a
                           synchronous DCP save, or once an async save's upload has finished (DCP's
                           coordinator writes ``.metadata`` only after gathering every rank's
                           write results). It records the step, the kind (``full`` or
                           ``model-only``), world size and data-parallel degree, the schedule
                           settings and the size of every file.
``job.json``               the job that owns the folder: ``JOB_UUID`` (Run:ai), else ``JOB_NAME``,
                           else an id chosen at first start. A different job gets a clear error
                           (exit 2) and the override, ``--resilience.take_over_folder``.
``lock.json``              who runs in the folder now (host, pid, time). A restart of the same job,
                           including after ``kill -9``, simply takes it over.

A ``step-N`` folder is *complete* when its marker exists, ``.metadata`` is readable, and every shard
file is at least as long as DCP's metadata says (a truncated shard is caught here, not by a bare
``EOFError`` mid-load). Incomplete ones (a save cut off by SIGKILL, a full disk, ...) are moved to
``.incomplete/`` with a warning, never deleted, and the newest complete one is loaded. Complete
checkpoints are never moved or deleted by this module (torchtitan's ``keep_latest_k`` still
retires old ones).

``RunaiCheckpointManager`` plugs this into torchtitan's ``CheckpointManager``: resume choice and
logging (``resuming from step N (path)``), the completion marker, always-full final and
preemption checkpoints (stock's ``last_save_model_only`` final checkpoint cannot be resumed), and
checks that the world size and schedule match the checkpoint's.
"""

from __future__ import annotations

import contextlib

import json
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

MARKER = ".complete.json"
OWNER = "job.json"
LOCK = "lock.json"
QUARANTINE = ".incomplete"
_STEP_RE = re.compile(r"^step-(\d+)$")
SCHEDULE_KEYS = (
    "training.steps",
    "lr_scheduler.warmup_steps",
    "lr_scheduler.total_steps",
    "lr_scheduler.decay_ratio",
    "lr_scheduler.decay_type",
    "lr_scheduler.min_lr_factor",
)


# ---------------------------------------------------------------------------------------------
# Files written atomically


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some network file systems refuse fsync on a directory
        pass


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Completeness


@dataclass(frozen=True)
class Found:
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


def _needed_sizes(path: Path) -> dict[str, int]:
    """File name -> bytes DCP's ``.metadata`` says it must hold (raises on unreadable metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    if metadata is None or not getattr(metadata, "state_dict_metadata", None):
        raise ValueError("no entries")
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    return needed


def inspect(path: Path, step: int | None = None) -> Found:
    """Is ``path`` (a ``step-N`` folder) a complete checkpoint? Cheap: sizes, no data read."""
    path = Path(path)
    if step is None:
        m = _STEP_RE.match(path.name)
        step = int(m.group(1)) if m else -1
    record = read_json(path / MARKER)
    if record is None:
        why = "no completion marker (the save was cut off)" if not (path / MARKER).exists() else "unreadable completion marker"
        return Found(step, path, False, why)
    if not (path / ".metadata").is_file():
        if (path / "model.safetensors.index.json").is_file() or list(path.glob("*.safetensors")):
            return Found(step, path, True, record=record)  # an HF-format final save
        return Found(step, path, False, "no .metadata", record)
    try:
        needed = _needed_sizes(path)
    except Exception as e:  # any unpickling error means the same thing: unusable
        return Found(step, path, False, f".metadata unreadable ({type(e).__name__})", record)
    recorded = record.get("files", {})
    for name, size in {**recorded, **needed}.items():
        file = path / name
        if not file.is_file():
            return Found(step, path, False, f"shard {name} is missing", record)
        actual = file.stat().st_size
        want = max(needed.get(name, 0), recorded.get(name, 0))
        if actual < want:
            return Found(step, path, False, f"shard {name} is truncated ({actual} of {want} bytes)", record)
    return Found(step, path, True, record=record)


def scan(folder: Path) -> list[Found]:
    """Every ``step-N`` folder, newest first, with its verdict."""
    return [inspect(path, step) for step, path in step_folders(folder)]


def newest_resumable(found: list[Found]) -> Found | None:
    return next((f for f in found if f.resumable), None)


def quarantine(found: Found, folder: Path) -> Path:
    """Move an incomplete checkpoint aside (never delete: someone may want to look at it)."""
    assert not found.complete, "complete checkpoints are never moved"
    target_dir = Path(folder) / QUARANTINE
    target_dir.mkdir(exist_ok=True)
    target = target_dir / f"{found.path.name}.{time.strftime('%Y%m%d-%H%M%S')}.{uuid.uuid4().hex[:6]}"
    os.replace(found.path, target)
    return target


def marker_record(step: int, kind: str, path: Path, config: Any, world_size: int, dp_degree: int,
                  job_id: str | None) -> dict[str, Any]:
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
        "schedule": schedule_of(config),
        "job": job_id,
        "time": time.time(),
        "host": socket.gethostname(),
        "files": files,
    }


def mark_complete(path: Path, record: Mapping[str, Any]) -> None:
    write_json_atomic(Path(path) / MARKER, record)


# ---------------------------------------------------------------------------------------------
# Resume policy: schedule and world size


def schedule_of(config: Any) -> dict[str, Any]:
    out = {}
    for key in SCHEDULE_KEYS:
        section, name = key.split(".")
        out[key] = getattr(getattr(config, section), name)
    return out


def _total(schedule: Mapping[str, Any]) -> int:
    return schedule.get("lr_scheduler.total_steps") or schedule["training.steps"]


def schedule_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any], step: int) -> list[str]:
    """Loud, concrete warnings for a resume whose schedule settings differ from the checkpoint's."""
    if not old:
        return []
    changed = [k for k in SCHEDULE_KEYS if k in old and old.get(k) != new.get(k)]
    if not changed:
        return []
    what = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
    lines = [f"resume from step {step} with changed schedule settings: {what}"]
    old_total, new_total = _total(old), _total(new)
    if old_total != new_total:
        lines.append(
            f"the learning-rate schedule is recomputed over {new_total} steps instead of {old_total}: "
            f"its decay now ends at step {new_total} (was {old_total}), so every step after {step} "
            "trains with a different learning rate than the original run planned; "
            f"to keep the original schedule pass --lr_scheduler.total_steps {old_total}")
    if old.get("lr_scheduler.warmup_steps") != new.get("lr_scheduler.warmup_steps"):
        lines.append(f"warmup now ends at step {new.get('lr_scheduler.warmup_steps')} "
                     f"(was {old.get('lr_scheduler.warmup_steps')})")
    if old.get("training.steps") != new.get("training.steps"):
        lines.append(f"training now stops at step {new.get('training.steps')} (was {old.get('training.steps')})")
    return lines


def world_size_error(found: Found, world_size: int, dp_degree: int) -> UserError | None:
    """A changed data-parallel degree cannot resume exactly: stop with how to proceed."""
    rec = found.record or {}
    old_dp, old_ws = rec.get("dp_degree"), rec.get("world_size")
    if old_dp is None or old_dp == dp_degree:
        return None
    return UserError(
        "world size", f"{old_ws} -> {world_size}",
        f"{found.path} was written by {old_dp} data-parallel rank(s) (world size {old_ws}); this run has "
        f"{dp_degree} (world size {world_size}), so the per-rank data positions cannot be restored",
        f"run with the original node/GPU count (world size {old_ws}), or continue from its weights in a new folder: "
        f"--checkpoint.folder <new> --checkpoint.initial_load_path {found.path} --checkpoint.initial_load_model_only "
        "(optimizer state and data position start afresh)")


def already_done(found: Found | None, steps: int) -> str | None:
    if found is not None and found.step >= steps:
        return (f"checkpoint {found.path} is at step {found.step}, at or past training.steps = {steps}: "
                f"the run is complete, nothing to train (raise --training.steps to train further)")
    return None


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


def check_writable(folder: Path, probe_bytes: int = 1 << 20) -> None:
    """Create the folder and write (then remove) a probe file; UserError if that fails."""
    folder = Path(folder)
    setting = "checkpoint.folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * probe_bytes)
                f.flush()
                os.fsync(f.fileno())
        finally:
            if probe.exists():
                probe.unlink()
    except OSError as e:
        reason = {28: "the disk is full", 30: "it is on a read-only file system", 13: "permission denied"}.get(
            e.errno, e.strerror or str(e))
        raise UserError(setting, str(folder), f"cannot write a checkpoint there ({reason})",
                        "mount a writable volume with room for checkpoints (e.g. a PVC) at that path, or set "
                        "job.dump_folder / checkpoint.folder to one")
    newest = next(iter(step_folders(folder)), None)
    if newest is not None:
        size = sum(p.stat().st_size for p in newest[1].rglob("*") if p.is_file())
        free = shutil.disk_usage(folder).free
        if free < size:
            raise UserError(setting, str(folder),
                            f"only {free / 2**30:.2f} GiB free but the last checkpoint took {size / 2**30:.2f} GiB",
                            "free space (lower checkpoint.keep_latest_k, delete old step-N folders) or grow the volume")


def checkpoint_folder(config: Any) -> Path:
    return Path(config.job.dump_folder) / config.checkpoint.folder


# ---------------------------------------------------------------------------------------------
# torchtitan's CheckpointManager, with the policy above


def _manager_base() -> type:
    from torchtitan_runai import upstream

    return upstream.CheckpointManager


class Preempted(Exception):
    """Raised at a step boundary after the preemption checkpoint is on disk."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by signal {signum}")


class RngState:
    """Every rank's CPU (and CUDA) RNG state, saved under a per-rank key like the dataloader's.

    torchtitan does not checkpoint RNG state; a resumed run would replay the RNG stream from the
    seed instead of continuing it (it matters as soon as anything random runs in a step).
    """

    def __init__(self, rank: int):
        self.key = f"rank{rank}"

    def state_dict(self) -> dict[str, Any]:
        import torch

        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return {self.key: state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        import torch

        state = state_dict[self.key]
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def saved_keys(path: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


class RunaiCheckpointManager(_manager_base()):  # type: ignore[misc]
    """torchtitan's CheckpointManager with completeness, resume policy and full final saves.

    Installed by ``RunaiTrainer`` with ``adopt`` on the manager torchtitan built (the Trainer has no
    hook to choose the class), so construction is exactly torchtitan's.
    """

    @classmethod
    def adopt(cls, manager, job_config, world_size: int, dp_degree: int, job_id: str | None):
        manager.__class__ = cls
        manager.job_config = job_config
        manager.world_size = world_size
        manager.dp_degree = dp_degree
        manager.job_id = job_id
        manager.pending_marker = None  # (step, kind) of an async save not yet marked complete
        manager.last_complete_step = -1
        manager.busy = contextlib.nullcontext  # the trainer pauses its hang watchdog while saving
        if manager.enable:
            manager.rng = RngState(cls._rank())
            manager.states["rng"] = manager.rng
        return manager

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _rank() -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_initialized() else 0

    @staticmethod
    def _broadcast(obj):
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _mark(self, step: int, kind: str) -> None:
        if self._rank() == 0:
            path = Path(self._create_checkpoint_id(step))
            mark_complete(path, marker_record(step, kind, path, self.job_config, self.world_size,
                                              self.dp_degree, self.job_id))
        self.last_complete_step = step

    # -- saving ----------------------------------------------------------------------------

    def save(self, curr_step: int, last_step: bool = False) -> None:
        import torch.distributed as dist

        if not self._should_save(curr_step, last_step) or not self.enable:
            return super().save(curr_step, last_step)
        with self.busy():
            self.finish_async(block=True)  # the previous async save must be marked before a new one
            super().save(curr_step, last_step)
            kind = "model-only" if last_step and self.last_save_in_hf else "full"
            if self.save_future is not None and not last_step:
                self.pending_marker = (curr_step, kind)
            else:
                if dist.is_initialized():
                    dist.barrier()
                self._mark(curr_step, kind)

    def finish_async(self, block: bool) -> bool:
        """Mark a finished async save complete; with ``block``, wait for it. True if none is pending."""
        if self.pending_marker is None:
            return True
        future = self.save_future
        if future is not None and not block and not future.done():
            return False
        if future is not None:
            with self.busy():
                future.result()
        step, kind = self.pending_marker
        self.pending_marker = None
        self._mark(step, kind)
        return True

    def _save_last_step(self, curr_step: int) -> None:
        # Stock saves a model-only checkpoint here when last_save_model_only is set, and then picks
        # it to resume from, which crashes. Our final and preemption checkpoints are always full.
        if self.last_save_model_only and not self.last_save_in_hf:
            from torchtitan_runai.upstream import logger

            logger.info("checkpoint.last_save_model_only is set: saving a full (resumable) checkpoint "
                        "instead; export the weights with torchtitan_runai.export")
            self.last_save_model_only = False
        super()._save_last_step(curr_step)

    def save_now(self, step: int) -> None:
        """A full checkpoint of ``step`` right now (preemption), unless one is already complete."""
        self.finish_async(block=True)
        if step <= 0 or self.last_complete_step == step or not self.enable or self.load_only:
            return
        self.save(step, last_step=True)

    # -- loading ---------------------------------------------------------------------------

    def _find_load_step(self, folder: str = "") -> int:
        if folder and folder != self.folder:
            return super()._find_load_step(folder)
        chosen = newest_resumable(scan(Path(self.folder)))
        return chosen.step if chosen else -1

    def choose(self, load_step: int) -> tuple[Found | None, list[str]]:
        """Rank 0 decides what to load (moving incomplete checkpoints aside); every rank learns it."""
        from torchtitan_runai.upstream import logger

        decision: tuple[Found | None, list[str], UserError | None] = (None, [], None)
        if self._rank() == 0:
            notes: list[str] = []
            error = None
            found = scan(Path(self.folder))
            chosen = None
            if load_step >= 0:
                chosen = next((f for f in found if f.step == load_step), None)
                if chosen is None or not chosen.complete:
                    error = UserError("checkpoint.load_step", load_step,
                                      f"{self.folder}/step-{load_step} " + ("does not exist" if chosen is None else f"is incomplete ({chosen.why})"),
                                      "pick a complete step-N folder, or unset checkpoint.load_step to resume from the newest")
            else:
                for f in found:
                    if f.resumable:
                        chosen = f
                        break
                    if not f.complete:
                        moved = quarantine(f, Path(self.folder))
                        notes.append(f"skipping incomplete checkpoint {f.path}: {f.why}; moved to {moved}")
                    else:
                        notes.append(f"skipping {f.path}: a {f.kind} checkpoint cannot be resumed")
            decision = (chosen, notes, error)
        chosen, notes, error = self._broadcast(decision)
        for note in notes:
            logger.warning(note)
        if error is not None:
            raise error
        return chosen, notes

    def load(self, step: int = -1) -> bool:
        from torchtitan_runai.upstream import logger

        if not self.enable:
            return super().load(step)
        chosen, _ = self.choose(step)
        if chosen is None:
            if self.initial_load_path or self.initial_load_in_hf:
                # torchtitan only honours an initial load when the folder does not exist yet; ours
                # exists (it holds job.json), so point it away for this one call.
                real, self.folder = self.folder, os.path.join(self.folder, ".no-checkpoint-yet")
                try:
                    loaded = super().load(-1)
                finally:
                    self.folder = real
                logger.info(f"no checkpoint in {self.folder}: starting fresh from the initial load")
                return loaded
            logger.info(f"no complete checkpoint in {self.folder}: starting fresh")
            return False
        error = world_size_error(chosen, self.world_size, self.dp_degree)
        if error is not None:
            raise error
        for line in schedule_changes((chosen.record or {}).get("schedule"), schedule_of(self.job_config), chosen.step):
            logger.warning(f"WARNING: {line}")
        logger.info(f"resuming from step {chosen.step} ({chosen.path})")
        done = already_done(chosen, self.job_config.training.steps)
        if done:
            logger.warning(done)
        excluded = list(self.exclude_from_loading)
        if "rng" in self.states and not any(k.startswith(f"rng.{self.rng.key}.") for k in saved_keys(chosen.path)):
            logger.warning(f"{chosen.path} has no RNG state for this rank: the RNG continues from the seed")
            self.exclude_from_loading = [*excluded, "rng"]
        try:
            loaded = super().load(chosen.step)
        finally:
            self.exclude_from_loading = excluded
        self.last_complete_step = chosen.step
        return loaded


# ---------------------------------------------------------------------------------------------
# The launcher's checks, once per pod before any worker starts


def prestart(config: Any, env: Mapping[str, str], world_size: int, dp_degree: int, write: bool = True,
             warn=print) -> str | None:
    """Check the checkpoint folder before workers start. Returns a message when there is nothing to
    do (the run is complete); raises UserError for a foreign owner, an unwritable or full folder, or
    a changed data-parallel degree; warns about incomplete checkpoints and schedule changes."""
    if not config.checkpoint.enable:
        return None
    folder = checkpoint_folder(config)
    take_over = config.resilience.take_over_folder
    claim_folder(folder, env, take_over=take_over, write=False)  # a foreign owner is refused first
    if write:
        check_writable(folder)
    found = scan(folder)
    load_step = config.checkpoint.load_step
    if load_step >= 0:
        chosen = next((f for f in found if f.step == load_step), None)
        if chosen is None or not chosen.complete:
            raise UserError("checkpoint.load_step", load_step,
                            f"{folder}/step-{load_step} " + ("does not exist" if chosen is None else f"is incomplete ({chosen.why})"),
                            "pick a complete step-N folder, or unset checkpoint.load_step to resume from the newest")
    else:
        chosen = newest_resumable(found)
    if chosen is not None:
        error = world_size_error(chosen, world_size, dp_degree)
        if error is not None:
            raise error
    claim_folder(folder, env, take_over=take_over, write=write)
    for f in found:
        if chosen is not None and f.step <= chosen.step:
            break
        if not f.complete:
            warn(f"[launch] warning: incomplete checkpoint {f.path} ({f.why}) will be skipped and moved to "
                 f"{folder / QUARANTINE}")
    if chosen is None:
        warn(f"[launch] no complete checkpoint in {folder}: starting fresh")
        return None
    done = already_done(chosen, config.training.steps)
    if done:
        return done
    for line in schedule_changes((chosen.record or {}).get("schedule"), schedule_of(config), chosen.step):
        warn(f"[launch] WARNING: {line}")
    warn(f"[launch] resuming from step {chosen.step} ({chosen.path})")
    return None
