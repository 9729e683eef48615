"""``RunaiCheckpointManager``: torchtitan's ``CheckpointManager`` with this fork's checkpoint policy.

It plugs ``checkpoint.folder`` (completion markers, what is complete) and ``checkpoint.resume``
(which checkpoint resumes, node-count and schedule checks) into torchtitan's manager: resume choice
and logging (``resuming from step N (path)``), the completion marker after every save and its line
(rank 0, once the checkpoint is complete: ``checkpoint at step N saved in S s: FOLDER``, the final
and preemption saves included; torchtitan's own line is printed before an async save is on disk and
never for the final one, ``log_filter`` demotes it), always-full
final and preemption checkpoints (stock's ``last_save_model_only`` final checkpoint cannot be
resumed), and every rank's RNG state in the checkpoint. The marker keeps the job's settings
(``checkpoint.resume.settings_of``: the seed as drawn, the schedule, the optimizer's values, the
batch); on resume the launcher has already named every changed one (``checkpoint.resume.prestart``),
and ``load`` applies this run's optimizer values to the restored optimizer (``apply_optimizer_settings``:
torch would keep the checkpoint's learning rate).

What a save costs the training loop: a synchronous save blocks for the whole write plus a barrier;
an async one (``checkpoint.async_mode``) blocks only for the copy to host memory, and its marker is
written at the next step boundary once the upload has finished (``finish_async``). Pinned staging
(``training.checkpoint.staging``) makes the first pinned save cost what later ones do; the upload process is
started at trainer start and survives the pod's signal (``checkpoint.upload``); every save writes
with ``checkpoint_perf.writer_threads`` threads (``dcp_save``). Each save charges its time to the
trainer's goodput ledger (``ledger``): the wait for the previous upload as ``upload_wait``, the rest
of the save and torchtitan's wait for staging in the next step (``maybe_wait_for_staging``) as
``checkpoint_stall``, after one device sync so the step before it keeps its own device time.

The preemption save (``save_now``, after every rank agreed on the step): wait for the upload in
flight and mark it, then save the step just finished synchronously from this process (staged
through the reusable pinned buffers when there are any, then written by the writer threads), a
barrier, the marker. It returns the one line that says how long signal -> marked checkpoint took.

Retention is ours (``checkpoint.folder.retain``; torchtitan's ``_purge_stale_checkpoints`` is off:
it ran only after interval saves, never after the final or preemption save, and counted every
``step-N`` folder, before an async save's folder even existed, so the folder kept growing past
``keep_latest_k``). Rank 0 applies the rule after every save is marked complete (interval, final,
preemption; on a thread, joined before the next save, at exit, and by ``save_now`` on every path:
the preempted process leaves with ``os._exit``, which would cut a pass off mid-removal) and before every save, with the
size of the newest complete checkpoint, so that old checkpoints make room for it (``_make_room``).
A full disk during a save (``is_disk_full``: ENOSPC from DCP or the marker, or any failed write on a
volume with almost nothing free) becomes one
``UserError`` naming the folder and the step (exit 2, no traceback); the partial folder of that
save is removed and the newest complete checkpoint is untouched.

torchtitan's Trainer has no hook to choose the manager class, so ``adopt`` swaps the ``__class__``
of the manager torchtitan built (its construction stays exactly torchtitan's), and the subclass
overrides its public ``load`` (which checkpoint resumes is ``checkpoint.resume.choose``'s alone:
torchtitan is then asked for that step, so its own newest-first ``_find_load_step`` never runs on
the folder), its private ``_save_last_step`` (a full final save instead of a model-only one), its public
``dcp_save`` (the same three DCP calls with our writer; Hugging Face saves go to torchtitan's) and
``close`` (the upload process first) and ``maybe_wait_for_staging`` (timed), turns off its private
``_purge_stale_checkpoints`` (retention above), and calls its private ``_should_save`` and
``_create_checkpoint_id`` (when to mark, where the step folder is).
These are pinned by the exact torchtitan version (``upstream.EXPECTED_TORCHTITAN``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from torchtitan_runai import upstream
from torchtitan_runai.checkpoint.folder import (
    StepFolder,
    examine,
    folder_bytes,
    is_disk_full,
    mark_complete,
    marker_record,
    newest_resumable,
    quarantine,
    retain,
    scan,
)
from torchtitan_runai.checkpoint.resume import (
    adoption_note,
    already_done,
    choose,
    data_record,
    model_only_note,
    schedule_of,
    settings_of,
)
from torchtitan_runai.config import PINNED_MODE
from torchtitan_runai.errors import UserError, forget_report, report_to_launcher
from torchtitan_runai.goodput.ledger import NullLedger
from torchtitan_runai.training.checkpoint import upload
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
        manager.save_began = {}  # step -> (time.monotonic() at the save's start, written in the background)
        manager.last_complete_step = -1
        manager.busy = contextlib.nullcontext  # the trainer pauses its hang watchdog while saving
        manager.ledger = NullLedger()  # the trainer's goodput ledger: saves charge their time to it
        perf = getattr(job_config, "checkpoint_perf", None)
        manager.writer_threads = perf.writer_threads if perf is not None else 1
        manager.upload = None
        manager.last_staging_s = None
        manager.retiring = None  # rank 0's retention pass after the last mark (a thread)
        forget_report()  # a full disk reported by the worker group this one replaces is not ours
        if manager.enable:
            manager.rng = RngState(cls._rank())
            manager.states["rng"] = manager.rng
            pinned = _mode(manager.async_mode) == PINNED_MODE and not manager.load_only
            if pinned and (perf is None or perf.early_upload_process) and upload.supported():
                manager.upload = upload.UploadProcess().start(manager.pg)
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
            record = marker_record(
                step, kind, path, schedule_of(self.job_config), self.world_size, self.dp_degree, self.job_id
            )
            loader = self.states.get("dataloader")
            record["data"] = data_record(self.job_config, self.dp_degree, getattr(loader, "format", "per-rank"))
            record["settings"] = settings_of(self.job_config)  # the seed as drawn: a resume keeps it
            mark_complete(path, record)
            logger.info(self._saved_line(step, path))
            self._retire_soon()
        getattr(self, "save_began", {}).pop(step, None)
        self.last_complete_step = step
        self.ledger.marked(step)

    def _saved_line(self, step: int, path: Path) -> str:
        """The checkpoint's one line, at its marker: the step, how long it took, the folder."""
        began, background = getattr(self, "save_began", {}).get(step, (None, False))
        if began is None:
            return f"checkpoint at step {step} saved: {path}"
        took = time.monotonic() - began
        if background:  # the marker waits for the next step boundary after the upload finished
            return f"checkpoint at step {step} saved in the background, complete {took:.2f} s after it began: {path}"
        return f"checkpoint at step {step} saved in {took:.2f} s: {path}"

    # -- retention (checkpoint.folder.retain; rank 0 only: the folder is shared) ----------------

    def _purge_stale_checkpoints(self) -> None:
        """torchtitan's purge is replaced by ``retain`` (see the module docstring)."""

    def _retire_soon(self) -> None:
        """The count rule after a mark, on a thread (deleting tens of GB can take seconds on a
        network volume): joined by the next save before it writes, and at exit."""
        self._retire_wait()
        if self.keep_latest_k <= 0:
            return
        self.retiring = threading.Thread(target=self._retire, name="checkpoint-retention", daemon=True)
        self.retiring.start()

    def _retire_wait(self) -> None:
        thread = getattr(self, "retiring", None)
        if thread is not None:
            thread.join()
            self.retiring = None

    def _retire(self, room_for: int | None = None) -> None:
        """One ``retain`` pass; with ``room_for`` (the step about to be saved) also the room rule,
        for a save the size of the newest complete checkpoint."""
        try:
            folder = Path(self.folder)
            found = scan(folder)
            need, protect = 0, ()
            if room_for is not None:
                newest = next((f for f in found if f.complete), None)
                need, protect = (folder_bytes(newest.path) if newest is not None else 0), (room_for,)
            line = retain(folder, self.keep_latest_k, protect, need, found=found).line()
        except Exception as e:  # retention must never stop training: the next pass tries again
            line = (
                f"checkpoint retention in {self.folder} failed ({type(e).__name__}: {e}); "
                "it retries after the next save"
            )
        if line:
            logger.warning(line) if room_for is not None else logger.info(line)

    def _make_room(self, step: int) -> None:
        """Before a save: finish the last retention pass, then apply the rule with room for this one."""
        self._retire_wait()
        if self._rank() == 0 and self.keep_latest_k > 0:
            self._retire(room_for=step)

    @contextlib.contextmanager
    def _disk_full_is_a_user_error(self, step: int):
        """ENOSPC inside a save (DCP, the upload, the marker) -> one UserError naming the folder
        and the step. The partial folder of that save goes (rank 0); nothing complete is touched."""
        try:
            yield
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if not is_disk_full(e, Path(self.folder)):
                raise
            path = Path(self._create_checkpoint_id(step))
            # every rank says the same; rank 0 removes it (a finished DCP save whose marker failed stays:
            # it is adopted at the next start)
            partial = not (path.is_dir() and examine(path, step).complete)
            if self._rank() == 0 and partial and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            newest = newest_resumable(scan(Path(self.folder)))
            kept = (
                f"the newest complete checkpoint (step {newest.step}) is intact and the run resumes from it"
                if newest is not None
                else "no checkpoint was complete yet; the run starts afresh"
            )
            error = UserError(
                "checkpoint.folder",
                str(self.folder),
                f"the disk is full: the step {step} checkpoint could not be written"
                f"{' (its partial folder is removed)' if partial else ''}. Nothing saved was lost: "
                f"{kept} once there is room",
                "free space on the volume, lower checkpoint.keep_latest_k, or grow the volume",
            )
            report_to_launcher(error)  # its last line and exit 2, even on the way out for a SIGTERM
            raise error from None

    # -- saving ----------------------------------------------------------------------------

    def dcp_save(
        self, state_dict, checkpoint_id, async_mode, enable_garbage_collection: bool = False, to_hf: bool = False
    ):
        """torchtitan's ``dcp_save`` (which lets DCP build a one-thread writer) with our writer:
        ``writer_threads`` threads; the early upload process waited for before an async save; a
        synchronous save staged through the reusable stager first when there is one."""
        if to_hf:
            return super().dcp_save(state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        writer = upload.writer(checkpoint_id, self.writer_threads)
        mode = _mode(async_mode)
        if mode == PINNED_MODE:
            if self.upload is not None:
                self.upload.wait_ready()
            result = dcp.async_save(
                state_dict,
                storage_writer=writer,
                process_group=self.pg,
                async_checkpointer_type=AsyncCheckpointerType.PROCESS,
                async_stager=self.stager,
            )
        elif mode == "async":
            result = dcp.async_save(state_dict, storage_writer=writer, process_group=self.pg)
        else:
            if self.stager is not None:  # device -> the pinned buffers the interval saves use, then write
                from torch.distributed.checkpoint.stateful import Stateful

                # what DCP's async_save hands its stager: Stateful objects as their state dicts
                plain = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()}
                began = time.monotonic()
                staged = self.stager.stage(plain)
                state_dict = staged.result() if hasattr(staged, "result") else staged
                self.last_staging_s = time.monotonic() - began
            result = dcp.save(state_dict, storage_writer=writer)
        if enable_garbage_collection:
            gc.collect(1)
        return result

    def save(self, curr_step: int, last_step: bool = False) -> None:
        import torch.distributed as dist

        if not self._should_save(curr_step, last_step) or not self.enable:
            return super().save(curr_step, last_step)
        _device_sync()  # once per save: the step before it is charged its device time, the save only its own
        self.ledger.saving(curr_step)
        with self.busy():
            with self.ledger.during("upload_wait"):
                self.finish_async(block=True)  # the previous async save must be marked before a new one
            with self.ledger.during("checkpoint_stall"), self._disk_full_is_a_user_error(curr_step):
                began = time.monotonic()  # this save's own time: after the wait for the previous one
                self._make_room(curr_step)  # rank 0, before any rank writes: DCP's first collective waits for it
                super().save(curr_step, last_step)
                kind = "model-only" if last_step and self.last_save_in_hf else "full"
                background = self.save_future is not None and not last_step
                self.save_began[curr_step] = (began, background)
                if background:
                    self.pending_marker = (curr_step, kind)
                else:
                    if dist.is_initialized():
                        dist.barrier()
                    self._mark(curr_step, kind)

    def maybe_wait_for_staging(self) -> None:
        """torchtitan's wait for the staging copy (inside the next step), charged as checkpoint stall."""
        if getattr(self, "enable_staging", False) and getattr(self, "staging", False):
            with self.ledger.during("checkpoint_stall"):
                return super().maybe_wait_for_staging()
        return super().maybe_wait_for_staging()

    def finish_async(self, block: bool) -> bool:
        """Mark a finished async save complete; with ``block``, wait for it. True if none is pending."""
        if self.pending_marker is None:
            return True
        future = self.save_future
        if future is not None and not block and not future.done():
            return False
        step, kind = self.pending_marker
        with self._disk_full_is_a_user_error(step):
            if future is not None:
                with self.busy():
                    future.result()
            self.pending_marker = None
            self._mark(step, kind)
        return True

    def _save_last_step(self, curr_step: int) -> None:
        # Stock saves a model-only checkpoint here when last_save_model_only is set, and then picks
        # it to resume from, which crashes. Our final and preemption checkpoints are always full.
        if self.last_save_model_only and not self.last_save_in_hf:
            logger.info(
                "checkpoint.last_save_model_only is set: saving a full (resumable) checkpoint "
                "instead; export the weights with torchtitan_runai.export"
            )
            self.last_save_model_only = False
        super()._save_last_step(curr_step)

    def save_now(self, step: int, signal_at: float) -> str:
        """A full checkpoint of ``step`` right now (preemption), unless one is already complete.

        First the upload in flight finishes and is marked. Returns the line for the log:
        signal (``signal_at``, ``time.monotonic``) -> marked checkpoint, and where the time went."""
        began = time.monotonic()
        waited_for = self.pending_marker[0] if self.pending_marker is not None else None
        self.finish_async(block=True)
        uploaded = time.monotonic()
        if step <= 0 or self.last_complete_step == step or not self.enable or self.load_only:
            # marking the upload started a retention pass: the process leaves with os._exit, which
            # would cut it off mid-removal
            self._retire_wait()
            what = "nothing new to save" if step <= 0 or not self.enable or self.load_only else "already complete"
            return f"preemption: signal -> exit path in {uploaded - signal_at:.2f}s; step {step}: {what}" + (
                f" (waited {uploaded - began:.2f}s for step {waited_for}'s upload, marked)" if waited_for else ""
            )
        self.last_staging_s = None
        self.save(step, last_step=True)
        self._retire_wait()  # the process leaves with os._exit: retention must be done by then
        done = time.monotonic()
        staged = "" if self.last_staging_s is None else f"staged from the device in {self.last_staging_s:.2f}s, "
        size = folder_bytes(Path(self._create_checkpoint_id(step)))  # every rank's part: the folder is shared
        upload_part = (
            f"waited {uploaded - began:.2f}s for step {waited_for}'s upload and marked it, "
            if waited_for
            else "no upload in flight, "
        )
        return (
            f"preemption: signal -> step {step} checkpoint marked in {done - signal_at:.2f}s ({upload_part}"
            f"saved {size / 1e9:.2f} GB, all ranks, in {done - uploaded:.2f}s: {staged}{self.writer_threads} "
            "writer thread(s) per rank)"
        )

    def close(self) -> None:
        """torchtitan's close, after stopping the upload process (it ignores SIGTERM: see upload)."""
        if getattr(self, "upload", None) is not None:
            self.upload.shutdown()
        self._retire_wait()
        super().close()

    # -- loading ---------------------------------------------------------------------------

    def choose(self, load_step: int) -> tuple[StepFolder | None, list[str]]:
        """Rank 0 decides what to load (moving incomplete checkpoints aside); every rank learns it."""
        decision: tuple[StepFolder | None, list[str], UserError | None] = (None, [], None)
        if self._rank() == 0:
            notes: list[str] = []
            error = None
            found = scan(Path(self.folder))
            chosen = None
            try:
                chosen = choose(found, load_step, Path(self.folder), bool(self.initial_load_path))
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
                        notes.append(model_only_note(f))
            if chosen is not None and chosen.adopted:
                notes.append(adoption_note(chosen))
            decision = (chosen, notes, error)
        chosen, notes, error = self._broadcast(decision)
        for note in notes:
            logger.warning(note)
        if error is not None:
            raise error
        return chosen, notes

    def load(self, step: int = -1) -> bool:
        # torchtitan's newest-first _find_load_step never runs: super().load gets a step, or -1 and a missing folder
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
        keys = saved_keys(chosen.path)
        loader = self.states.get("dataloader")
        if (
            hasattr(loader, "use_per_rank")
            and "dataloader" not in self.exclude_from_loading
            and any(k.startswith("dataloader.dp_rank_") for k in keys)
        ):
            loader.use_per_rank()  # written before global data positions, or with data.order = "per-rank"
        # the batch plan and every changed setting were said once by the launcher (checkpoint.resume.prestart)
        logger.info(f"resuming from step {chosen.step} ({chosen.path})")
        done = already_done(chosen, self.job_config.training.steps)
        if done:
            logger.warning(done)
        excluded = list(self.exclude_from_loading)
        if "rng" in self.states and not any(k.startswith(f"rng.{self.rng.key}.") for k in keys):
            logger.warning(f"{chosen.path} has no RNG state for this rank: the RNG continues from the seed")
            self.exclude_from_loading = [*self.exclude_from_loading, "rng"]
        for name in ("lr_scheduler", "dataloader"):  # a stock checkpoint may lack what we always save
            if (
                name in self.states
                and name not in self.exclude_from_loading
                and not any(k == name or k.startswith(f"{name}.") for k in keys)
            ):
                logger.warning(f"{chosen.path} has no {name} state: it starts afresh")
                self.exclude_from_loading = [*self.exclude_from_loading, name]
        try:
            loaded = super().load(chosen.step)
        finally:
            self.exclude_from_loading = excluded
        if "optimizer" not in excluded and "optimizer" in self.states:
            apply_optimizer_settings(self.states["optimizer"], self.states.get("lr_scheduler"), self.job_config)
        self.last_complete_step = chosen.step
        return loaded


def apply_optimizer_settings(optimizers: Any, schedulers: Any, job_config: Any) -> None:
    """This run's optimizer values on a restored optimizer, from the resumed step on.

    torch's ``load_state_dict`` restores the checkpoint's param groups (lr, betas, eps, weight decay)
    with the moments, and ``LambdaLR`` its ``base_lrs``: a new ``optimizer.lr`` would be ignored
    silently. The schedule's shape is this run's already (torchtitan's lambda is rebuilt from the
    config); the moments stay the checkpoint's. ``checkpoint.resume.setting_changes`` names the change."""
    import torch

    opt = job_config.optimizer
    values = {"betas": (opt.beta1, opt.beta2), "eps": opt.eps, "weight_decay": opt.weight_decay}
    for optimizer in getattr(optimizers, "optimizers", None) or [optimizers]:
        for group in optimizer.param_groups:
            for key, value in values.items():
                if key in group:
                    group[key] = value
            if "initial_lr" in group:
                group["initial_lr"] = opt.lr
    for scheduler in getattr(schedulers, "schedulers", None) or []:
        scheduler.base_lrs = [opt.lr for _ in scheduler.base_lrs]
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        scheduler._last_lr = lrs


def _device_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _mode(async_mode: Any) -> str:
    """torchtitan's AsyncMode (a str enum) or a config string, as the config spells it."""
    return str(getattr(async_mode, "value", async_mode)).lower()
