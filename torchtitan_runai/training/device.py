"""Device and backend choice: CUDA with NCCL when a GPU is visible, else CPU with gloo.

torchtitan 0.2.2 assumes an accelerator. For the CPU rehearsal (and CI) three things differ:

- the device and process-group backend: ``upstream.use_cpu_device`` points torchtitan at the CPU,
  which makes it pick gloo;
- FSDP's gradient reduce-scatter: gloo has no AVG reduction, so FSDP modules are told to reduce
  with SUM and divide themselves (``set_force_sum_reduction_for_comms``); the result is the same
  average gradient;
- memory metrics: CUDA's allocator statistics do not exist, so they are reported as unavailable
  (``CpuMemoryMonitor``) instead of crashing the metrics processor.

On a GPU nothing here changes torchtitan's behaviour.
"""

from __future__ import annotations

import torch

from torchtitan_runai import upstream


def has_accelerator() -> bool:
    return torch.cuda.is_available()


class CpuMemoryMonitor:
    """Stands in for torchtitan's DeviceMemoryMonitor where there is no device memory to read."""

    available = False
    device_name = "cpu"
    device_capacity_gib = 0.0

    def get_peak_stats(self):
        return upstream.DeviceMemStats(0.0, 0.0, 0.0, 0.0, 0, 0)

    def reset_peak_stats(self) -> None:
        pass


def build_cpu_memory_monitor() -> CpuMemoryMonitor:
    upstream.logger.debug("CPU run: device memory metrics are unavailable (reported as 0)")
    return CpuMemoryMonitor()


def select_device() -> str:
    """Choose the device type for this process; returns "cuda" or "cpu"."""
    if has_accelerator():
        return "cuda"
    upstream.use_cpu_device(build_cpu_memory_monitor)
    return "cpu"


def uses_gloo() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_backend() == "gloo"


def force_sum_reduction(model: torch.nn.Module) -> int:
    """Make every FSDP unit of ``model`` reduce gradients with SUM (gloo lacks AVG). Returns count."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_force_sum_reduction_for_comms(True)
    return len(units)
