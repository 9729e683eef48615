"""torchtitan_runai.training.checkpoint.manager: RNG state in the checkpoint.

Checkpoints here are real DCP checkpoints written by torch.distributed.checkpoint (one process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckpt_util import config, write_ckpt
from torchtitan_runai.training.checkpoint import manager
from torchtitan_runai.errors import UserError


def test_rng_state_round_trips_through_dcp(tmp_path):
    rng = manager.RngState(rank=0)
    torch.manual_seed(7)
    torch.rand(3)
    dcp.save({"rng": rng.state_dict()}, checkpoint_id=str(tmp_path / "step-1"))
    expected = torch.rand(5)
    torch.manual_seed(99)  # what a restarted process would have: the RNG from the seed
    state = {"rng": rng.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "step-1"))
    rng.load_state_dict(state["rng"])
    assert torch.equal(torch.rand(5), expected)
    assert "rng.rank0.cpu" in manager.saved_keys(tmp_path / "step-1")
