"""What a job prints: one readable, parseable line per event, on every rank.

``kubectl logs`` interleaves the output of every rank of a pod (and tools collect several pods), so
every line carries its origin, and colour codes are only emitted to a terminal::

    [titan] 2026-01-01 12:00:00,000 - node0/rank3 - INFO - step: 10  loss:  7.81234  ...

- ``configure_logging(rank, node_rank)`` (``configure_logging_from_env()`` under torchrun, which
  sets RANK and GROUP_RANK) re-formats torchtitan's logger: its ``[titan] time - ... - LEVEL -``
  layout with ``node/rank`` where torchtitan prints the logger name (always ``root``), and ANSI
  escapes stripped unless the stream is a terminal (``NO_COLOR`` set: never; ``FORCE_COLOR``
  set: always).
- ``RunaiMetricsProcessor`` (the train spec's ``build_metrics_processor_fn``) logs one line per
  log step with torchtitan's fields and spelling, so parsers matching ``step: N  loss: X`` keep
  working, plus the time left to ``training.steps``::

      step: 10  loss:  7.81234  grad_norm:  1.2345  memory: 61.20GiB(77.35%)  tps: 7,312
      tflops: 338.43  mfu: 34.22%  eta: 5:12:09

  (one line in the log). Where there is no device memory to read (the CPU rehearsal) memory and
  MFU print ``n/a`` instead of numbers that mean nothing, and are not sent to TensorBoard.
  TensorBoard and W&B receive exactly torchtitan's metrics otherwise.
- ``startup_summary(...)`` returns the lines a job prints once at start: world size, nodes,
  parallelism, seed, config file, tokenizer, checkpoint folder and resumed-from step, with resolved
  values (the global batch as trained, not the config's -1).
- a person's log: ``PersonFilter`` (on torchtitan's console handler, ``install_person_filter``)
  moves the set-up lines a reader does not need (``QUIET``: device mesh, model-args JSON, GC
  timings, "Trainer is initialized ...", the per-save chatter) to DEBUG, shows a repeated lookup
  warning once, and writes one line per checkpoint (``checkpoint at step N saved in S s``);
  ``quiet_expected_noise`` silences the Python warnings this path always raises
  (``EXPECTED_WARNINGS``) and the datasets progress bars. ``LOG_LEVEL=debug`` keeps all of it.

NCCL's own logging is left alone: NCCL_DEBUG is passed through when the user sets it and never
forced (INFO prints several lines per communicator per rank).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from typing import Any, Mapping, TextIO

from torchtitan_runai import storage, upstream

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LINE_FORMAT = "[titan] %(asctime)s - {origin} - %(levelname)s - %(message)s"


def strip_ansi(text: str) -> str:
    return ANSI_ESCAPE.sub("", text)


def wants_color(stream: TextIO | None = None, env: Mapping[str, str] = os.environ) -> bool:
    """Colour only for a terminal; NO_COLOR (https://no-color.org) and FORCE_COLOR override."""
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR"):
        return True
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def origin(rank: int, node_rank: int | None = None) -> str:
    return f"rank{rank}" if node_rank is None else f"node{node_rank}/rank{rank}"


class RankFormatter(logging.Formatter):
    """torchtitan's line layout with the node/rank; ANSI escapes removed when ``color`` is off."""

    def __init__(self, rank: int, node_rank: int | None = None, color: bool = False):
        super().__init__(LINE_FORMAT.format(origin=origin(rank, node_rank)))
        self.color = color

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if self.color else strip_ansi(line)


def configure_logging(rank: int, node_rank: int | None = None, *, stream: TextIO | None = None,
                      color: bool | None = None, log: logging.Logger | None = None) -> bool:
    """Give torchtitan's logger (set up by ``init_logger``) our per-rank, colour-aware format.

    Call after ``upstream.init_logger()`` (torchtitan's ``main`` calls it first; calling it again
    would undo this). Returns whether colour is on, for ``metrics.disable_color_printing``.
    """
    log = upstream.logger if log is None else log
    if not log.handlers:
        upstream.init_logger()
    # torchtitan's console handler is a plain StreamHandler; subclasses (file or test-capture
    # handlers that others attached) keep their own format.
    consoles = [h for h in log.handlers if type(h) is logging.StreamHandler]
    for handler in consoles:
        if stream is not None:
            handler.setStream(stream)
    target = stream or (consoles[0].stream if consoles else sys.stdout)
    color = wants_color(target) if color is None else color
    for handler in consoles:
        handler.setFormatter(RankFormatter(rank, node_rank, color))
    return color


def configure_logging_from_env(env: Mapping[str, str] = os.environ, **kwargs: Any) -> bool:
    """``configure_logging`` with torchrun's RANK and GROUP_RANK (node rank)."""
    node = env.get("GROUP_RANK", env.get("NODE_RANK"))
    return configure_logging(int(env.get("RANK", "0")), int(node) if node else None, **kwargs)


# --------------------------------------------------------------------------------------------
# the step line


def format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "n/a"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def step_line(step: int, loss: float, grad_norm: float, *, tps: float, tflops: float,
              mfu: float | None, memory_gib: float | None, memory_pct: float | None,
              eta_s: float | None, color: Any = None) -> str:
    """torchtitan's step line (same fields, order and number formats) plus ``eta``."""
    c = color or upstream.NoColor()
    memory = (f"{memory_gib:5.2f}GiB({memory_pct:.2f}%)" if memory_gib is not None else "n/a")
    mfu_text = f"{mfu:.2f}%" if mfu is not None else "n/a"
    return (
        f"{c.red}step: {step:2}  "
        f"{c.green}loss: {loss:8.5f}  "
        f"{c.orange}grad_norm: {grad_norm:7.4f}  "
        f"{c.turquoise}memory: {memory}  "
        f"{c.blue}tps: {round(tps):,}  "
        f"{c.cyan}tflops: {tflops:,.2f}  "
        f"{c.magenta}mfu: {mfu_text}  "
        f"{c.white}eta: {format_eta(eta_s)}{c.reset}"
    )


def memory_available(monitor: Any) -> bool:
    """False for a monitor that has no device memory to read (``device.CpuMemoryMonitor``)."""
    return bool(getattr(monitor, "available", True))


class RunaiMetricsProcessor(upstream.MetricsProcessor):
    """torchtitan's MetricsProcessor with our step line (ETA, ``n/a`` where unmeasurable).

    Everything else (TensorBoard/W&B loggers, which rank logs, peak-FLOPS lookup, validation
    lines) is torchtitan's.
    """

    def __init__(self, job_config: Any, parallel_dims: Any, tag: str | None = None):
        super().__init__(job_config, parallel_dims, tag)
        if job_config.metrics.disable_color_printing or not wants_color():
            self.color = upstream.NoColor()
        self.last_log_step: int | None = None

    @property
    def has_memory(self) -> bool:
        return memory_available(self.device_memory_monitor)

    def seconds_per_step(self, step: int, time_delta: float) -> float:
        # The first window after a (re)start is step 1 alone, or up to log_freq steps.
        first = step if step == 1 else min(step, self.job_config.metrics.log_freq)
        steps = step - self.last_log_step if self.last_log_step is not None else first
        return time_delta / max(steps, 1)

    def log(self, step: int, global_avg_loss: float, global_max_loss: float, grad_norm: float,
            extra_metrics: dict[str, Any] | None = None) -> None:
        assert self.num_flops_per_token > 0, "num_flops_per_token must be set"
        time_delta = time.perf_counter() - self.time_last_log
        tps = self.ntokens_since_last_log / (
            time_delta * self.parallel_dims.non_data_parallel_size)
        tflops = self.num_flops_per_token * tps / 1e12
        mfu = 100 * self.num_flops_per_token * tps / self.gpu_peak_flops if self.has_memory \
            else None
        loading = self.data_loading_times or [0.0]
        seconds_per_step = self.seconds_per_step(step, time_delta)
        eta_s = max(self.job_config.training.steps - step, 0) * seconds_per_step

        metrics: dict[str, Any] = {
            "loss_metrics/global_avg_loss": global_avg_loss,
            "loss_metrics/global_max_loss": global_max_loss,
            "grad_norm": grad_norm,
            "throughput(tps)": tps,
            "tflops": tflops,
            "time_metrics/end_to_end(s)": seconds_per_step,
            "time_metrics/data_loading(s)": sum(loading) / len(loading),
            "time_metrics/data_loading(%)": 100 * sum(loading) / time_delta,
            "time_metrics/eta(s)": eta_s,
        }
        memory_gib = memory_pct = None
        if self.has_memory:
            stats = self.device_memory_monitor.get_peak_stats()
            memory_gib, memory_pct = stats.max_reserved_gib, stats.max_reserved_pct
            metrics.update({
                "mfu(%)": mfu,
                "memory/max_active(GiB)": stats.max_active_gib,
                "memory/max_active(%)": stats.max_active_pct,
                "memory/max_reserved(GiB)": stats.max_reserved_gib,
                "memory/max_reserved(%)": stats.max_reserved_pct,
                "memory/num_alloc_retries": stats.num_alloc_retries,
                "memory/num_ooms": stats.num_ooms,
            })
        if extra_metrics:
            metrics.update(extra_metrics)
        self.logger.log(metrics, step)

        upstream.logger.info(step_line(
            step, global_avg_loss, grad_norm, tps=tps, tflops=tflops, mfu=mfu,
            memory_gib=memory_gib, memory_pct=memory_pct, eta_s=eta_s, color=self.color))

        self.last_log_step = step
        self.ntokens_since_last_log = 0
        self.data_loading_times.clear()
        self.time_last_log = time.perf_counter()
        self.device_memory_monitor.reset_peak_stats()


def build_metrics_processor(job_config: Any, parallel_dims: Any, model_args: Any = None,
                            tag: str | None = None) -> RunaiMetricsProcessor:
    """The train spec's ``build_metrics_processor_fn`` (same signature as torchtitan's)."""
    return RunaiMetricsProcessor(job_config, parallel_dims, tag)


# --------------------------------------------------------------------------------------------
# startup summary


def startup_summary(job_config: Any, *, world_size: int, nodes: int,
                    parallel_dims: Any = None, seed: int | None = None,
                    config_file: str | None = None, resumed_from_step: int | None = None,
                    device: str | None = None, initial_load: str | None = None) -> list[str]:
    """The lines printed once when a job starts (rank 0), one fact per line."""
    p = parallel_dims if parallel_dims is not None else job_config.parallelism
    degrees = {
        "dp_replicate": getattr(p, "dp_replicate", getattr(p, "data_parallel_replicate_degree", 1)),
        "dp_shard": getattr(p, "dp_shard", getattr(p, "data_parallel_shard_degree", -1)),
        "tp": getattr(p, "tp", getattr(p, "tensor_parallel_degree", 1)),
        "pp": getattr(p, "pp", getattr(p, "pipeline_parallel_degree", 1)),
        "cp": getattr(p, "cp", getattr(p, "context_parallel_degree", 1)),
        "ep": getattr(p, "ep", getattr(p, "expert_parallel_degree", 1)),
    }
    per_node = f" ({world_size // nodes} per node)" if nodes and world_size % nodes == 0 else ""
    t, m, c = job_config.training, job_config.model, job_config.checkpoint
    dp = degrees["dp_replicate"] * degrees["dp_shard"] if degrees["dp_shard"] > 0 else None
    global_batch = t.global_batch_size if t.global_batch_size > 0 else (t.local_batch_size * dp if dp else "auto")
    if resumed_from_step:
        start = f"resumed from step {resumed_from_step}"
    elif initial_load:
        start = f"fresh optimizer, initial weights from {initial_load}"
    else:
        start = "starting fresh (no complete checkpoint)"
    ckpt_folder = str(storage.checkpoint_dir(job_config)) if c.enable else "disabled"
    lines = [
        f"run: world_size={world_size} nodes={nodes}{per_node}"
        + (f" device={device}" if device else ""),
        "parallelism: " + " ".join(f"{k}={v}" for k, v in degrees.items()),
        f"model: {m.name} {m.flavor}  seq_len={t.seq_len}  local_batch_size={t.local_batch_size}"
        f"  global_batch_size={global_batch}  steps={t.steps}  dtype={t.mixed_precision_param}",
        f"seed: {seed if seed is not None else job_config.debug.seed}"
        f"  deterministic={job_config.debug.deterministic}",
        f"config: {config_file or job_config.job.config_file or 'n/a'}",
        f"tokenizer: {m.hf_assets_path}",
        f"checkpoint: {ckpt_folder}  {start}",
    ]
    if job_config.metrics.enable_tensorboard:
        lines.append(f"tensorboard: {storage.tensorboard_dir(job_config)}")
    return lines


def log_startup_summary(lines: list[str]) -> None:
    for line in lines:
        upstream.logger.info(line)


# --------------------------------------------------------------------------------------------
# a person's log: expected noise at DEBUG, LOG_LEVEL=debug shows it all

EXPECTED_WARNINGS = (
    # torch/torchtitan on a CPU device mesh (the rehearsal); harmless, printed by every rank
    r"DTensor random operators may not have complete support on cpu device mesh",
    r"DTensor manual_seed\(\) may not have complete support on cpu device mesh",
    r"Set timeout is now only supported for either nccl or gloo",
    r"In cpu autocast, but the target dtype is not supported",
    # torchdata's StatefulDataLoader calls a deprecated torch API on every construction
    r"'set_vital' is deprecated",
)
"""Python warnings that this path always raises (message prefixes, regex)."""

QUIET = (
    # setup steps the startup summary or a later line already states
    r"torch\.distributed is already initialized",  # we create the gloo group (resilience.init_gloo)
    r"Building device mesh with parallelism", r"Successfully created meshes", r"\[GC\] ",
    r"Loading tokenizer from", r"Applied .* to the model",
    r"Compiling (each|the)", r"model\.safetensors\.index\.json not found at hf_assets_path",
    r"Checkpointing active\.", r"TensorBoard logging enabled", r"Mixed precision training is handled by", r"Trainer is initialized with",
    r"Training starts at step", r"Synchronizing and adjusting timeout", r"Loading the checkpoint from",
    r"Saving the checkpoint \(or staging", r"Saving a full checkpoint at last step", r"Sleeping \d+ seconds for",
    r"Training completed", r"Destroying the purge thread", r"seed: \d+$", r"Error running lspci",
    r"no complete checkpoint in \S+: starting fresh$",  # the startup summary says it
)
"""torchtitan's (and our) INFO/WARNING lines shown only at LOG_LEVEL=debug."""

QUIET_ON_CPU = (r"Peak flops undefined for: cpu", r"Peak FLOPS used for computing MFU",
                r"CPU memory usage for model")
"""Meaningless without a GPU: MFU and device memory print n/a in the step line."""

ONCE = (r"Peak flops undefined for",)
"""Shown the first time only (torchtitan looks the peak up twice)."""

SAVED = re.compile(r"Finished saving the checkpoint \(or staging if async is enabled\) ?in ([0-9.]+) seconds")


def log_level(env: Mapping[str, str] = os.environ) -> int:
    return logging.DEBUG if env.get("LOG_LEVEL", "").strip().lower() == "debug" else logging.INFO


class PersonFilter(logging.Filter):
    """Demotes the QUIET lines to DEBUG (dropped unless LOG_LEVEL=debug), keeps ONCE lines once,
    and rewrites torchtitan's checkpoint line as ``checkpoint at step N saved in S s``.

    ``step``: the trainer's current step (a callable: the filter is installed before it exists);
    ``stopping``: whether a stop signal is being handled (the final save is then not "the last step").
    """

    def __init__(self, level: int = logging.INFO, cpu: bool = False, step=lambda: None, stopping=lambda: False):
        super().__init__()
        self.level = level
        self.quiet = re.compile("|".join(f"(?:{p})" for p in (*QUIET, *(QUIET_ON_CPU if cpu else ()))))
        self.once = re.compile("|".join(f"(?:{p})" for p in ONCE))
        self.seen: set[str] = set()
        self.step, self.stopping = step, stopping

    def _set(self, record: logging.LogRecord, level: int, message: str | None = None) -> None:
        record.levelno, record.levelname = level, logging.getLevelName(level)
        if message is not None:
            record.msg, record.args = message, None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Building ") and "with {" in message:
            head, _, body = message.partition("with {")
            self._set(record, logging.DEBUG, f"{head.rstrip()} with {{{body}")  # upstream lacks the space
        elif (saved := SAVED.search(message)) is not None:
            step = self.step()
            where = f" at step {step}" if step is not None else ""
            self._set(record, record.levelno, f"checkpoint{where} saved in {float(saved.group(1)):.2f} s")
        elif self.stopping() and "at last step" in message:
            self._set(record, logging.DEBUG, message.replace("at last step", "at the stop"))
        elif self.quiet.match(message):
            self._set(record, logging.DEBUG)
        elif self.once.match(message):
            if message in self.seen:
                self._set(record, logging.DEBUG)
            self.seen.add(message)
        return record.levelno >= self.level


def quiet_expected_noise(env: Mapping[str, str] = os.environ) -> None:
    """Silence, at their source, the warnings this path always raises (unless LOG_LEVEL=debug)."""
    if log_level(env) == logging.DEBUG:
        return
    import warnings

    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # the datasets library's "Generating train split" bars, on every rank, for a local dataset
    try:
        import datasets
    except ImportError:
        return
    datasets.disable_progress_bars()


def install_person_filter(*, cpu: bool, step=lambda: None, stopping=lambda: False,
                          env: Mapping[str, str] = os.environ, log: logging.Logger | None = None) -> PersonFilter:
    """Put a PersonFilter on torchtitan's console handler(s) and the logger's level to LOG_LEVEL."""
    log = upstream.logger if log is None else log
    level = log_level(env)
    person = PersonFilter(level, cpu=cpu, step=step, stopping=stopping)
    log.setLevel(min(level, log.level or level))
    for handler in log.handlers:
        handler.filters = [f for f in handler.filters if not isinstance(f, PersonFilter)]
        handler.addFilter(person)
        if level == logging.DEBUG:
            handler.setLevel(logging.DEBUG)
    return person
