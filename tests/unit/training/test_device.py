"""torchtitan_runai.training.device: the CPU/gloo rehearsal path (no GPU here; CUDA is what is mocked away)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from torchtitan_runai.training.device import CpuMemoryMonitor, force_sum_reduction, uses_gloo

REPO = Path(__file__).resolve().parents[3]


def test_cpu_memory_monitor_reports_nothing_instead_of_crashing():
    monitor = CpuMemoryMonitor()
    assert monitor.available is False and monitor.device_capacity_gib == 0.0
    stats = monitor.get_peak_stats()
    assert tuple(stats) == (0.0, 0.0, 0.0, 0.0, 0, 0)
    monitor.reset_peak_stats()


def test_select_device_points_torchtitan_at_the_cpu():
    """In a fresh process (it rebinds torchtitan's module globals): "cpu", and torchtitan's device
    helpers now name the CPU and our monitor instead of CUDA's."""
    script = textwrap.dedent("""
        from torchtitan_runai import upstream
        from torchtitan_runai.training import device
        print(device.select_device(), upstream.dist_utils.device_type,
              upstream._tt_metrics.build_device_memory_monitor is device.build_cpu_memory_monitor,
              upstream._tt_utils.device_module.current_device())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["cpu", "cpu", "True", "0"]


def test_fsdp_units_reduce_by_sum_on_gloo(tmp_path):
    """A real one-rank gloo process group and FSDP2: gloo has no AVG, so every FSDP unit is told
    to reduce with SUM; without a process group nothing is gloo."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    assert uses_gloo() is False
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert uses_gloo() is True
        mesh = init_device_mesh("cpu", (1,))
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert force_sum_reduction(model) == 2
        states = [m._get_fsdp_state()._fsdp_param_group for m in (model, model[0])]
        assert all(group.force_sum_reduction_for_comms for group in states)
        assert force_sum_reduction(torch.nn.Linear(2, 2)) == 0
    finally:
        dist.destroy_process_group()
