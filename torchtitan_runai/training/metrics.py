"""The step line and the start-up summary: torchtitan's metrics processor with this fork's log.

``RunaiMetricsProcessor`` (the train spec's ``build_metrics_processor_fn``) logs one line per
log step with torchtitan's fields and spelling, so parsers matching ``step: N  loss: X`` keep
working, plus the time left to ``training.steps``::

    step: 10  loss:  7.81234  grad_norm:  1.2345  memory: 61.20GiB(77.35%)  tps: 7,312
    tflops: 338.43  mfu: 34.22%  eta: 5:12:09

(one line in the log). Where there is no device memory to read (the CPU rehearsal) the line
leaves out memory, tflops and mfu, which mean nothing there (no device memory, no peak FLOPS: they
would read ``n/a`` or ``0.00``)::

    step: 10  loss:  7.81234  grad_norm:  1.2345  tps: 2,048  eta: 0:00:12

memory and MFU are then not sent to TensorBoard either. TensorBoard and W&B receive exactly
torchtitan's metrics otherwise.

``startup_summary(...)`` returns the lines a job prints once at start: world size, nodes,
parallelism, seed, config file, tokenizer, checkpoint folder and resumed-from step, with resolved
values (the global batch as trained, not the config's -1).
"""

from __future__ import annotations

import math
import time
from typing import Any

from torchtitan_runai import storage, upstream
from torchtitan_runai.training.log_format import wants_color

# --------------------------------------------------------------------------------------------
# the step line


def format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "n/a"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def step_line(
    step: int,
    loss: float,
    grad_norm: float,
    *,
    tps: float,
    tflops: float | None,
    mfu: float | None,
    memory_gib: float | None,
    memory_pct: float | None,
    eta_s: float | None,
    color: Any = None,
) -> str:
    """torchtitan's step line (same fields, order and number formats) plus ``eta``; a field given as
    None (memory, tflops, mfu on CPU) is left out rather than printed as ``n/a``."""
    c = color or upstream.NoColor()
    memory = f"{c.turquoise}memory: {memory_gib:5.2f}GiB({memory_pct:.2f}%)  " if memory_gib is not None else ""
    tflops_text = f"{c.cyan}tflops: {tflops:,.2f}  " if tflops is not None else ""
    mfu_text = f"{c.magenta}mfu: {mfu:.2f}%  " if mfu is not None else ""
    return (
        f"{c.red}step: {step:2}  "
        f"{c.green}loss: {loss:8.5f}  "
        f"{c.orange}grad_norm: {grad_norm:7.4f}  "
        f"{memory}"
        f"{c.blue}tps: {round(tps):,}  "
        f"{tflops_text}"
        f"{mfu_text}"
        f"{c.white}eta: {format_eta(eta_s)}{c.reset}"
    )


def memory_available(monitor: Any) -> bool:
    """False for a monitor that has no device memory to read (``device.CpuMemoryMonitor``)."""
    return bool(getattr(monitor, "available", True))


class RunaiMetricsProcessor(upstream.MetricsProcessor):
    """torchtitan's MetricsProcessor with our step line (ETA; on CPU no memory, tflops or mfu).

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

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ) -> None:
        assert self.num_flops_per_token > 0, "num_flops_per_token must be set"
        time_delta = time.perf_counter() - self.time_last_log
        tps = self.ntokens_since_last_log / (time_delta * self.parallel_dims.non_data_parallel_size)
        tflops = self.num_flops_per_token * tps / 1e12
        mfu = 100 * self.num_flops_per_token * tps / self.gpu_peak_flops if self.has_memory else None
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
            metrics.update(
                {
                    "mfu(%)": mfu,
                    "memory/max_active(GiB)": stats.max_active_gib,
                    "memory/max_active(%)": stats.max_active_pct,
                    "memory/max_reserved(GiB)": stats.max_reserved_gib,
                    "memory/max_reserved(%)": stats.max_reserved_pct,
                    "memory/num_alloc_retries": stats.num_alloc_retries,
                    "memory/num_ooms": stats.num_ooms,
                }
            )
        if extra_metrics:
            metrics.update(extra_metrics)
        self.logger.log(metrics, step)

        upstream.logger.info(
            step_line(
                step,
                global_avg_loss,
                grad_norm,
                tps=tps,
                tflops=tflops if self.has_memory else None,  # CPU: no peak FLOPS, no meaning
                mfu=mfu,
                memory_gib=memory_gib,
                memory_pct=memory_pct,
                eta_s=eta_s,
                color=self.color,
            )
        )

        self.last_log_step = step
        self.ntokens_since_last_log = 0
        self.data_loading_times.clear()
        self.time_last_log = time.perf_counter()
        self.device_memory_monitor.reset_peak_stats()


def build_metrics_processor(
    job_config: Any, parallel_dims: Any, model_args: Any = None, tag: str | None = None
) -> RunaiMetricsProcessor:
    """The train spec's ``build_metrics_processor_fn`` (same signature as torchtitan's)."""
    return RunaiMetricsProcessor(job_config, parallel_dims, tag)


# --------------------------------------------------------------------------------------------
# startup summary


def startup_summary(
    job_config: Any,
    *,
    world_size: int,
    nodes: int,
    parallel_dims: Any = None,
    seed: int | None = None,
    config_file: str | None = None,
    resumed_from_step: int | None = None,
    device: str | None = None,
    initial_load: str | None = None,
) -> list[str]:
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
        f"run: world_size={world_size} nodes={nodes}{per_node}" + (f" device={device}" if device else ""),
        "parallelism: " + " ".join(f"{k}={v}" for k, v in degrees.items()),
        f"model: {m.name} {m.flavor}  seq_len={t.seq_len}  local_batch_size={t.local_batch_size}"
        f"  global_batch_size={global_batch}  steps={t.steps}  dtype={t.mixed_precision_param}",
        f"seed: {seed if seed is not None else job_config.debug.seed}  deterministic={job_config.debug.deterministic}",
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
