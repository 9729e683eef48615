"""``RunaiCheckpointManager``: torchtitan's ``CheckpointManager`` with this fork's checkpoint policy.

It plugs ``checkpoint.folder`` (completion markers, what is complete) and ``checkpoint.resume``
(which checkpoint resumes, node-count and schedule checks) into torchtitan's manager: resume choice
and logging (``resuming from step N (path)``), the completion marker after every save, always-full
final and preemption checkpoints (stock's ``last_save_model_only`` final checkpoint cannot be
resumed), and every rank's RNG state in the checkpoint.

What a save costs the training loop: a synchronous save blocks for the whole write plus a barrier;
an async one (``checkpoint.async_mode``) blocks only for the copy to host memory, and its marker is
written at the next step boundary once the upload has finished (``finish_async``). Pinned staging
(``checkpoint.staging``) makes the first pinned save cost what later ones do.

torchtitan's Trainer has no hook to choose the manager class, so ``adopt`` swaps the ``__class__``
of the manager torchtitan built (its construction stays exactly torchtitan's), and the subclass
overrides torchtitan's private ``_find_load_step`` (our resume choice for the folder's own
checkpoints) and ``_save_last_step`` (a full final save instead of a model-only one), and calls its
private ``_should_save`` and ``_create_checkpoint_id`` (when to mark, where the step folder is).
These are pinned by the exact torchtitan version (``upstream.EXPECTED_TORCHTITAN``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from torchtitan_runai import upstream
from torchtitan_runai.checkpoint.folder import (
    StepFolder,
    mark_complete,
    marker_record,
    newest_resumable,
    quarantine,
    scan,
)
from torchtitan_runai.checkpoint.resume import (already_done, choose, data_record, plan_resume, schedule_changes,
                                                schedule_of)
from torchtitan_runai.errors import UserError
from torchtitan_runai.upstream import logger


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


class RunaiCheckpointManager(upstream.CheckpointManager):
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
            record = marker_record(step, kind, path, schedule_of(self.job_config), self.world_size,
                                   self.dp_degree, self.job_id)
            loader = self.states.get("dataloader")
            record["data"] = data_record(self.job_config, self.dp_degree, getattr(loader, "format", "per-rank"))
            mark_complete(path, record)
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

    def choose(self, load_step: int) -> tuple[StepFolder | None, list[str]]:
        """Rank 0 decides what to load (moving incomplete checkpoints aside); every rank learns it."""
        decision: tuple[StepFolder | None, list[str], UserError | None] = (None, [], None)
        if self._rank() == 0:
            notes: list[str] = []
            error = None
            found = scan(Path(self.folder))
            chosen = None
            try:
                chosen = choose(found, load_step, Path(self.folder))
            except UserError as e:
                error = e
            if load_step < 0:
                for f in found:
                    if chosen is not None and f.step <= chosen.step:
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
        plan = plan_resume(chosen, self.job_config, self.world_size, self.dp_degree)
        keys = saved_keys(chosen.path)
        loader = self.states.get("dataloader")
        if hasattr(loader, "use_per_rank") and "dataloader" not in self.exclude_from_loading \
                and any(k.startswith("dataloader.dp_rank_") for k in keys):
            loader.use_per_rank()  # written before global data positions, or with data.order = "per-rank"
        if plan is not None and plan.changed:
            logger.info(plan.line())
        for line in schedule_changes((chosen.record or {}).get("schedule"), schedule_of(self.job_config), chosen.step):
            logger.warning(f"WARNING: {line}")
        logger.info(f"resuming from step {chosen.step} ({chosen.path})")
        done = already_done(chosen, self.job_config.training.steps)
        if done:
            logger.warning(done)
        excluded = list(self.exclude_from_loading)
        if "rng" in self.states and not any(k.startswith(f"rng.{self.rng.key}.") for k in keys):
            logger.warning(f"{chosen.path} has no RNG state for this rank: the RNG continues from the seed")
            self.exclude_from_loading = [*excluded, "rng"]
        try:
            loaded = super().load(chosen.step)
        finally:
            self.exclude_from_loading = excluded
        self.last_complete_step = chosen.step
        return loaded
