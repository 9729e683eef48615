"""Helpers of the checkpoint tests: real DCP checkpoints (one process) and a minimal config."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed.checkpoint as dcp

from torchtitan_runai.checkpoint import folder as ckfolder
from torchtitan_runai.checkpoint import resume


def write_ckpt(folder: Path, step: int, mark: bool = True, dp: int = 2, steps: int = 10) -> Path:
    path = folder / f"step-{step}"
    dcp.save({"w": torch.arange(1000, dtype=torch.float32) * step, "b": torch.ones(10)}, checkpoint_id=str(path))
    if mark:
        ckfolder.mark_complete(
            path, ckfolder.marker_record(step, "full", path, resume.schedule_of(config(steps=steps)), 2, dp, "job")
        )
    return path


def stock_ckpt(folder: Path, step: int, full: bool = True, dp: int = 2) -> Path:
    """A real DCP checkpoint with torchtitan's state names, no marker (what stock writes)."""
    path = folder / f"step-{step}"
    sd = {"tok_embeddings.weight": torch.randn(64, 8), "norm.weight": torch.ones(8)}
    if full:
        sd.update(
            {
                "optimizer": {"state": {"tok_embeddings.weight": {"exp_avg": torch.zeros(64, 8)}}},
                "train_state": {"step": torch.tensor(step)},
                "lr_scheduler": {"lr_scheduler_0": {"last_epoch": step}},
                "dataloader": {f"dp_rank_{r}": {"pos": r} for r in range(dp)},
            }
        )
    dcp.save(sd, checkpoint_id=str(path))
    return path


def config(steps=10, warmup=2, total=None, folder="ckpt", dump="."):
    return SimpleNamespace(
        training=SimpleNamespace(steps=steps),
        lr_scheduler=SimpleNamespace(
            warmup_steps=warmup, total_steps=total, decay_ratio=None, decay_type="linear", min_lr_factor=0.0
        ),
        job=SimpleNamespace(dump_folder=dump),
        checkpoint=SimpleNamespace(enable=True, folder=folder, load_step=-1, initial_load_path=None),
        resilience=SimpleNamespace(take_over_folder=False),
    )
