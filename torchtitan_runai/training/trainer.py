"""The Trainer every rank runs: torchtitan's Trainer plus this fork's seams.

``run(argv)`` is the body of ``train.py``: pick the device (CUDA, else CPU/gloo), register our train
spec, parse and validate the config exactly as the launcher did, then build ``RunaiTrainer`` and
train. ``RunaiTrainer`` overrides these methods of torchtitan 0.2.2's ``Trainer`` (public ones,
which its own ``train`` loop calls: ``init_distributed``, ``load_state_dict``, ``close``,
``batch_generator``, ``forward_backward_step``, ``train_step``, ``should_continue_training``) and uses no private
Trainer method. The one place that reaches into torchtitan's internals is the checkpoint manager:
``training.checkpoint.manager.RunaiCheckpointManager.adopt`` swaps the ``__class__`` of the manager the
Trainer built (there is no hook to choose its class) and overrides its ``load`` and private
``_save_last_step`` (see that module's docstring for why); ``training.device`` rebinds
torchtitan's device globals for the CPU rehearsal (``upstream.use_cpu_device``). All of it is
pinned to the exact torchtitan version (``upstream``).

- ``forward_backward_step`` with pipeline parallel: the loss's gradient divided by the step's token
  count and the last stage's loss on every rank (upstream torchtitan issue #2972; ``training.loss``).
- ``init_distributed``: on gloo (CPU), create the process group with retries under a fresh store
  prefix per attempt (``gloo.init_gloo``: stock restarts fail most of the time); then agree on
  the run's 32-bit seed (rank 0 draws it when ``debug.seed`` is unset, ``seed``: the
  original example's first patch) and log ``seed: N``.
- after torchtitan builds its ``CheckpointManager``, it becomes a ``RunaiCheckpointManager``
  (``torchtitan_runai.training.checkpoint.manager``): newest *complete* checkpoint, completion markers, full
  final saves, world-size and schedule checks.
- logging: node/rank on every line, no colours off a terminal, a startup summary (world, nodes,
  parallelism, seed, config, tokenizer, resumed-from step) before the first step; what this path
  always prints and a reader does not need at debug level (``log_filter.PersonFilter``, ``LOG_LEVEL``,
  ``log_filter.quiet_expected_noise``); at the end the
  optional Hugging Face export (``[export] at_end``, rank 0, after the process group is destroyed)
  and the loss/throughput PNG (``plots``);
- goodput (``torchtitan_runai.goodput``): rank 0's ledger is built first, so every second from the
  process's start is in one category; the loop's first boundary ends start-up, the first step is
  compilation (one device sync after it), every boundary credits the step, ``batch_generator``
  times the data loader, the checkpoint manager charges saves; a goodput line, TensorBoard's
  ``goodput/`` scalars and ``goodput.json`` every ``goodput.log_freq`` steps and at the end; the
  ledger's outcome (finished, preempted, failed, hung) at exit.
- checkpoint staging: ``training.checkpoint.staging.install`` keeps pinned staging buffers across async saves and
  prepares them in the background from the start;
- ``init_distributed`` also confirms every rank sees the same checkpoint folder (a node-local folder
  on a multi-node job is a clear error, ``checkpoint.ownership.confirm_shared_folder``).
- ``should_continue_training`` (torchtitan calls it at every step boundary): feeds the hang
  watchdog, marks finished async saves complete, and all-reduces the SIGTERM/SIGINT flag; when any
  rank got one, every rank waits for the upload in flight (and marks it), saves a full checkpoint
  of the step just finished, logs ``preemption: signal -> step N checkpoint marked in X s (...)``
  and stops, and the process exits 143 (130 for SIGINT) without the end-of-run teardown. A signal
  before this process finished its first step leaves at once (``StopFlag.before_first_step``).

A rank dies with its launcher: ``run`` first asks the kernel for SIGKILL when the launcher (torchrun's
agent runs inside it) dies, however it dies (``lifetime.die_with_parent``; the pid is checked against
the one the launcher left in ``lifetime.LAUNCHER_ENV``, so a launcher that died while this process
was importing is caught too). SIGKILL, not SIGTERM: with the launcher gone nobody waits for a
preemption save or reports it, and a rank stuck in a collective would never act on SIGTERM; the
writing process goes with the rank (``training.checkpoint.upload``), and the next run resumes from the
newest complete checkpoint, as after a crashed node. Without this, ``kill -9`` of the launcher left
the ranks training and saving as orphans beside the next run (docs/resilience.md).

A finished run tears down explicitly (close the checkpointer, barrier, destroy the process group)
and leaves with ``os._exit`` (``errors.flush_and_exit``): stock torchtitan aborts in interpreter
teardown in ~1 of 20 runs.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from torchtitan_runai import goodput, lifetime, plots, seed, storage, upstream
from torchtitan_runai.checkpoint import ownership, subclasses
from torchtitan_runai.config import Resilience
from torchtitan_runai.errors import flush_and_exit
from torchtitan_runai.hf.export import export_at_end
from torchtitan_runai.job import parse_job_config
from torchtitan_runai.jsonio import read_json
from torchtitan_runai.training import (
    data_position,
    device,
    gloo,
    log_filter,
    log_format,
    metrics,
    signals,
    spec,  # noqa: F401  registers our train specs (validation imports none)
    step_trace,
    watchdog,
)
from torchtitan_runai.training.checkpoint import staging
from torchtitan_runai.training.checkpoint.manager import Preempted, RunaiCheckpointManager
from torchtitan_runai.training.loss import last_stage_loss, pipeline_step

logger = upstream.logger


class RunaiTrainer(upstream.Trainer):
    def __init__(self, job_config):
        # first: from here (and from this process's start) every second of rank 0 is accounted for
        self.ledger = goodput.build_ledger(job_config)
        log_format.configure_logging_from_env()
        self.resumed_from: int | None = None
        self.stop_flag = signals.StopFlag()
        self.stop_flag.before_first_step = self._leave_now
        self.stop_flag.install()
        self.log_filter = log_filter.install_person_filter(
            cpu=not device.has_accelerator(),
            stopping=lambda: bool(self.stop_flag.signum),
        )
        res = getattr(job_config, "resilience", None) or Resilience()
        self.watchdog = watchdog.Watchdog(res.hang_timeout_seconds, res.heartbeat_seconds)
        self.step_trace = step_trace.StepTrace()
        self.data_trace = data_position.StepRecorder()
        self._step_loss = None
        # A float8 run's checkpoint names torchao's weight class: allowed before torchtitan reads one
        # without float8 configured (an initial load, a resume); checkpoint/subclasses.py.
        subclasses.allow_on_ranks(job_config)
        super().__init__(job_config)
        pd = self.parallel_dims
        owner = read_json(storage.checkpoint_dir(job_config) / ownership.OWNER) or {}
        job_id = owner.get("job") or ownership.job_identity(os.environ)[0]
        RunaiCheckpointManager.adopt(
            self.checkpointer, job_config, pd.world_size, pd.dp_replicate * pd.dp_shard, job_id
        )
        self.checkpointer.busy = self.watchdog.paused
        self.checkpointer.ledger = self.ledger
        self.watchdog.on_hang = self.ledger.hung
        # Before the first save: pinned staging buffers kept across checkpoints (torch 2.11 drops
        # them after every save and loses the second checkpoint), prepared in the background now
        # rather than inside the first save (bench/results/checkpoint-stall-*, pinning-*).
        self.staging_pool = staging.install(
            self.checkpointer,
            job_config.checkpoint,
            getattr(job_config, "checkpoint_perf", None),
            model_parts=self.model_parts,
            optimizer_name=job_config.optimizer.name,
        )
        self.watchdog.start()

    def _leave_now(self, signum: int) -> None:
        self.ledger.end("preempted")
        _leave_now(signum)

    def init_distributed(self):
        if (
            not device.has_accelerator()
            and "TORCHELASTIC_RESTART_COUNT" in os.environ
            and not torch.distributed.is_initialized()
        ):
            gloo.init_gloo(self.job_config.comm.init_timeout_seconds)
        parallel_dims = super().init_distributed()
        debug = self.job_config.debug
        debug.seed = seed.agree_on_seed(debug.seed, self.device)
        logger.info(f"seed: {debug.seed}")
        if self.job_config.checkpoint.enable and torch.distributed.is_initialized():
            # Before any checkpoint is read or written: a node-local folder on a multi-node job
            # would give every node its own, unresumable checkpoints.
            ownership.confirm_shared_folder(
                storage.checkpoint_dir(self.job_config),
                torch.distributed.get_rank(),
                torch.distributed.get_world_size(),
                ownership.job_identity(os.environ)[0],
            )
        return parallel_dims

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.resumed_from = self.step

    def log_startup_summary(self) -> None:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        jc = self.job_config
        metrics.log_startup_summary(
            metrics.startup_summary(
                jc,
                world_size=self.parallel_dims.world_size,
                nodes=int(os.environ.get("GROUP_WORLD_SIZE", "1")),
                parallel_dims=self.parallel_dims,
                seed=jc.debug.seed,
                config_file=jc.job.config_file,
                resumed_from_step=self.resumed_from,
                device=self.device.type,
                initial_load=jc.checkpoint.initial_load_path,
            )
        )

    def close(self) -> None:
        super().close()  # flushes the TensorBoard writer the plot reads
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            plots.plot_at_end(self.job_config)

    def forward_backward_step(self, *args, **kwargs):
        if self.parallel_dims.pp_enabled:
            # Upstream torchtitan issue #2972: the pipelined loss divides its gradient by the step's
            # token count, and every stage reports the last stage's loss (training/loss.py).
            with pipeline_step(self.loss_fn, kwargs["global_valid_tokens"]):
                loss = super().forward_backward_step(*args, **kwargs)
            loss = last_stage_loss(loss, self.pp_has_last_stage, self.parallel_dims.get_mesh("pp").get_group())
        else:
            loss = super().forward_backward_step(*args, **kwargs)
        detached = loss.detach()
        if self.step_trace.enabled or self.data_trace.enabled:
            self._step_loss = detached if self._step_loss is None else self._step_loss + detached
        return loss

    def batch_generator(self, data_iterable):
        batches = super().batch_generator(data_iterable)
        while True:
            with self.ledger.during("data_wait"):
                batch = next(batches)
            yield batch

    def train_step(self, data_iterator):
        self._step_loss = None
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        super().train_step(data_iterator)
        if self.stop_flag.before_first_step is not None and self.device.type == "cuda":
            torch.cuda.synchronize()  # once per process: the ledger charges the first step its device time
        # From now on a signal is handled at the step boundary: there is a step to save.
        self.stop_flag.before_first_step = None
        if self._step_loss is not None:
            self.step_trace.record(self.step, self._step_loss.item())
            self.data_trace.record(self.step, self._step_loss.item(), lr)

    def should_continue_training(self) -> bool:
        # The first boundary after this process's first step arms the watchdog: loading and
        # compilation are not counted against the hang timeout.
        first = getattr(self, "_boundaries", 0) == 0
        self.watchdog.progress(self.step, arm=not first)
        if first:  # checkpoint loaded, nothing trained yet
            self.ledger.loop_started(self.step)
            self.log_startup_summary()
        else:
            self.ledger.step_done(self.step)
        self._boundaries = getattr(self, "_boundaries", 0) + 1
        self.checkpointer.finish_async(block=False)
        signum = signals.agree(self.stop_flag.signum, self.device)
        if signum:
            logger.warning(
                f"stopping at step {self.step} (signal {signum}): finishing the upload in flight, "
                "then saving a full checkpoint"
            )
            self.ledger.switch("preemption_save")
            logger.warning(self.checkpointer.save_now(self.step, self.stop_flag.when or time.monotonic()))
            raise Preempted(signum)
        more = super().should_continue_training()
        if not first and (not more or self.step % self.job_config.goodput.log_freq == 0):
            self.report_goodput(final=not more)
        if not more:
            self.ledger.switch("teardown")
        return more

    def report_goodput(self, final: bool = False) -> None:
        """The goodput line so far, TensorBoard's goodput/ scalars and goodput.json (rank 0). At the
        last step the line is DEBUG: the launcher's at its exit is the run's one figure (the same
        ledger with the teardown and the exit: ``goodput.report_at_exit``)."""
        records = self.ledger.records()
        if records is None:
            return
        summary = goodput.summarize(records)
        (logger.debug if final else logger.info)(goodput.goodput_line(summary, goodput.so_far(self.step)))
        metric_logger = getattr(getattr(self, "metrics_processor", None), "logger", None)
        if metric_logger is not None:
            metric_logger.log(goodput.report.tensorboard_scalars(summary), self.step)
        goodput.write_summary(self.job_config, summary)


def _leave_now(signum: int) -> None:
    """A signal before this process finished a training step: nothing new to save, so leave at once
    (StopFlag). The checkpoint upload process may still be starting: it goes too."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    flush_and_exit(128 + signum)


def _teardown_preempted(trainer) -> None:
    """After the preemption checkpoint is marked: only what must not be lost. The pinned staging
    memory, the process group and the plots go with the process (torchrun's kill window counts)."""
    trainer.watchdog.stop()
    upload = getattr(getattr(trainer, "checkpointer", None), "upload", None)
    if upload is not None:
        upload.kill()  # idle: every upload was waited for; a TERMINATE round trip costs seconds here
    metrics = getattr(trainer, "metrics_processor", None)
    if metrics is not None:
        metrics.close()  # flushes TensorBoard


def _teardown(trainer) -> None:
    trainer.watchdog.stop()
    if hasattr(trainer, "checkpointer"):
        trainer.checkpointer.finish_async(block=True)
    trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run(argv: list[str]) -> int:
    # First: a rank never outlives the launcher that started it (kill -9 included), nor trains and
    # saves beside the next run (``lifetime``).
    lifetime.die_with_parent(lifetime.launcher_pid(os.environ), signal.SIGKILL)
    log_filter.quiet_expected_noise()
    upstream.init_logger()
    device.select_device()
    # with the world size: a resume on another node count keeps its global batch (checkpoint.resume)
    job_config = parse_job_config(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")), resume=True)
    trainer = RunaiTrainer(job_config)
    try:
        trainer.train()
    except Preempted as stop:
        code = 128 + stop.signum
        _teardown_preempted(trainer)
        trainer.ledger.end("preempted")
        logger.warning(
            f"exiting {code} {time.monotonic() - (trainer.stop_flag.when or time.monotonic()):.2f}s after the signal"
        )
        flush_and_exit(code)
    except BaseException:
        trainer.ledger.end("failed")
        trainer.watchdog.stop()
        trainer.close()
        raise
    _teardown(trainer)
    if trainer.step == job_config.training.steps:
        # After the process group is gone: a long export must not hold the other ranks in a
        # collective (NCCL timeout) nor trip the hang watchdog.
        export_at_end(job_config, trainer.step, int(os.environ.get("RANK", "0")))
    trainer.ledger.end("finished" if trainer.step == job_config.training.steps else "stopped")
    flush_and_exit(0)
