"""torchtitan_runai.checkpoint.ownership: job.json, lock.json and the shared-folder check.

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
from torchtitan_runai.checkpoint import ownership
from torchtitan_runai.errors import UserError


def test_job_identity_and_folder_ownership(tmp_path):
    folder = tmp_path / "ckpt"
    assert ownership.claim_folder(folder, {"JOB_UUID": "u1", "JOB_NAME": "n"}) == "u1"
    assert ownership.claim_folder(folder, {"JOB_UUID": "u1"}) == "u1"  # restart: stale lock is fine
    with pytest.raises(UserError, match="belongs to another job"):
        ownership.claim_folder(folder, {"JOB_UUID": "u2"})
    with pytest.raises(UserError, match="take_over_folder"):
        ownership.claim_folder(folder, {})
    assert ownership.claim_folder(folder, {"JOB_UUID": "u2"}, take_over=True) == "u2"
    assert json.loads((folder / ownership.OWNER).read_text())["previous"]["job"] == "u1"


def test_job_without_identity_chooses_one_and_keeps_it(tmp_path):
    first = ownership.claim_folder(tmp_path, {})
    assert first.startswith("chosen-")
    assert ownership.claim_folder(tmp_path, {}) == first
    with pytest.raises(UserError):
        ownership.claim_folder(tmp_path, {"JOB_NAME": "named"})
