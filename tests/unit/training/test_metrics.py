"""training.metrics: torchtitan's step-line fields + ETA, the startup summary.

The metrics processor is torchtitan's real one (real TensorBoard writer, real gloo process group
of one rank); only the GPU is faked (a memory monitor that answers like CUDA's).
"""

from __future__ import annotations

import io
import logging
import re
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from torchtitan_runai import plots, upstream
from torchtitan_runai.training import log_format, metrics

# What existing torchtitan log parsers and dashboards match.
# torchtitan's metrics module: where the trainer's memory monitor is built (device.py swaps it).
METRICS_MODULE = sys.modules[upstream.MetricsProcessor.__module__]
TORCHTITAN_STEP = re.compile(r"step:\s*(\d+)\s+loss:\s*([\d.]+)\s+grad_norm:\s*([\d.]+)")


@pytest.fixture
def console():
    """A plain StreamHandler on torchtitan's (root) logger, like init_logger's; removed after."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = upstream.logger
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream, handler
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def job_config(tmp_path: Path, **metrics):
    config = upstream.JobConfig()
    config.job.dump_folder = str(tmp_path / "dump")
    config.training.steps = 100
    config.metrics.log_freq = 5
    config.metrics.enable_tensorboard = True
    for key, value in metrics.items():
        setattr(config.metrics, key, value)
    return config


def parallel_dims():
    return upstream.ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)


class FakeCudaMonitor:
    """Answers like torchtitan's DeviceMemoryMonitor on an H100 (no GPU in CI)."""

    device_name = "NVIDIA H100 80GB HBM3"
    device_capacity_gib = 79.1

    def get_peak_stats(self):
        return upstream.DeviceMemStats(40.0, 50.5, 61.2, 77.35, 0, 0)

    def reset_peak_stats(self):
        pass


def cpu_monitor():
    from torchtitan_runai.training.device import CpuMemoryMonitor

    return CpuMemoryMonitor()


def test_format_eta():
    assert metrics.format_eta(0) == "0:00:00"
    assert metrics.format_eta(3725.4) == "1:02:05"
    assert metrics.format_eta(100 * 3600) == "100:00:00"
    assert metrics.format_eta(None) == "n/a" and metrics.format_eta(float("inf")) == "n/a"


# ----------------------------------------------------------------------- metrics processor


def run_two_log_steps(config, processor):
    processor.num_flops_per_token = 6_000_000
    processor.ntokens_since_last_log = 4096
    processor.data_loading_times.append(0.01)
    processor.log(1, 7.5, 7.6, 1.25, extra_metrics={"lr": 1e-4})
    processor.ntokens_since_last_log = 4 * 4096
    processor.data_loading_times.append(0.01)
    processor.time_last_log = time.perf_counter() - 40.0  # 4 steps in 40 s: 10 s/step
    processor.log(5, 6.25, 6.5, 0.5)
    processor.close()


def test_cpu_step_line_keeps_torchtitan_fields_that_mean_something(tmp_path, console, process_group, monkeypatch):
    monkeypatch.setattr(METRICS_MODULE, "build_device_memory_monitor", cpu_monitor)
    stream, _ = console
    log_format.configure_logging(rank=0, node_rank=0)
    config = job_config(tmp_path)
    processor = metrics.build_metrics_processor(config, parallel_dims(), None)
    assert isinstance(processor.color, upstream.NoColor)
    run_two_log_steps(config, processor)

    lines = [line for line in stream.getvalue().splitlines() if "step:" in line]
    assert len(lines) == 2
    assert [TORCHTITAN_STEP.search(line).groups()[:2] for line in lines] == [("1", "7.50000"), ("5", "6.25000")]
    last = lines[1]
    assert "node0/rank0" in last and "\x1b" not in last
    # no device memory, no peak FLOPS: memory, tflops and mfu would be "n/a" or 0.00 (issue 24)
    assert "memory:" not in last and "mfu:" not in last and "tflops:" not in last and "n/a" not in last
    assert "tps: " in last
    assert last.endswith("eta: 0:15:50")  # 95 steps left x 10 s

    scalars = plots.read_scalars(Path(config.job.dump_folder) / "tb")
    assert scalars["loss_metrics/global_avg_loss"] == {1: 7.5, 5: 6.25}
    assert scalars["lr"] == {1: pytest.approx(1e-4)}
    assert "mfu(%)" not in scalars and "memory/max_reserved(GiB)" not in scalars
    png = plots.plot_at_end(config)
    assert png == Path(config.job.dump_folder) / "tb" / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_step_line_has_memory_and_mfu(tmp_path, console, process_group, monkeypatch):
    monkeypatch.setattr(METRICS_MODULE, "build_device_memory_monitor", FakeCudaMonitor)
    stream, _ = console
    log_format.configure_logging(rank=0)
    config = job_config(tmp_path, enable_tensorboard=False)
    processor = metrics.build_metrics_processor(config, parallel_dims(), None)
    run_two_log_steps(config, processor)
    last = [line for line in stream.getvalue().splitlines() if "step:" in line][-1]
    assert TORCHTITAN_STEP.search(last).groups() == ("5", "6.25000", "0.5000")
    assert "memory: 61.20GiB(77.35%)" in last
    mfu = float(re.search(r"mfu: ([\d.]+)%", last).group(1))
    # 16384 tokens / 40 s x 6e6 flop/token over H100's 989 TFLOPS
    assert mfu == pytest.approx(100 * 6e6 * 16384 / 40 / 989e12, abs=0.01)


# -------------------------------------------------------------------------- startup summary


def test_startup_summary(tmp_path):
    config = job_config(tmp_path)
    config.model.flavor = "8B"
    config.debug.seed = 1234
    config.checkpoint.enable = True
    lines = metrics.startup_summary(
        config,
        world_size=16,
        nodes=2,
        seed=1234,
        config_file="train_configs/llama3_8b.toml",
        resumed_from_step=500,
        device="cuda",
    )
    text = "\n".join(lines)
    assert "world_size=16 nodes=2 (8 per node) device=cuda" in text
    assert "parallelism: dp_replicate=1 dp_shard=-1 tp=1 pp=1 cp=1" in text
    assert "seed: 1234" in text and "config: train_configs/llama3_8b.toml" in text
    assert f"tokenizer: {config.model.hf_assets_path}" in text
    assert "resumed from step 500" in text and "tensorboard: " in text
    fresh = metrics.startup_summary(config, world_size=1, nodes=1, parallel_dims=parallel_dims())
    assert any("starting fresh (no complete checkpoint)" in line for line in fresh)
    assert any("dp_shard=1" in line for line in fresh)
    # the resolved global batch, not the config's -1 (main printed global_batch_size=-1, the trainer 8)
    assert config.training.global_batch_size == -1
    assert any(f"global_batch_size={config.training.local_batch_size}" in line for line in fresh)
    assert any("global_batch_size=auto" in line for line in lines)  # dp_shard=-1 not yet resolved: no guess
