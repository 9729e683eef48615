"""torchtitan_runai.training.checkpoint.manager: RNG state in the checkpoint.

Checkpoints here are real DCP checkpoints written by torch.distributed.checkpoint (one process).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from ckpt_util import config, write_ckpt

from torchtitan_runai.training.checkpoint import manager


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


def bare_manager(folder: Path, initial_load_path: str | None = None) -> manager.RunaiCheckpointManager:
    """A RunaiCheckpointManager with what ``load`` reads and torchtitan's own ``load`` behind it."""
    m = object.__new__(manager.RunaiCheckpointManager)
    m.enable, m.enable_ft_dataloader_checkpoints, m.folder = True, False, str(folder)
    m.initial_load_path, m.initial_load_in_hf, m.initial_load_model_only = initial_load_path, False, False
    m.initial_load_in_hf_quantized, m.sd_adapter, m.exclude_from_loading = False, None, []
    m.states = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    m.job_config, m.world_size, m.dp_degree, m.last_complete_step = config(), 2, 2, -1
    return m


def test_only_resume_choose_picks_the_checkpoint_torchtitans_newest_first_pick_never_runs(tmp_path, monkeypatch):
    """The own-folder branch of ``_find_load_step`` was dropped as unreachable: ``load`` hands torchtitan a
    step, or -1 with ``folder`` pointed at a path that does not exist. Here torchtitan's pick would be step 5
    (a stock model-only save: it has .metadata), ours is step 3."""
    called = []
    monkeypatch.setattr(
        manager.upstream.CheckpointManager, "_find_load_step", lambda self, folder="": called.append(folder) or -1
    )
    write_ckpt(tmp_path, 3)
    write_ckpt(tmp_path, 5, mark=False)
    m = bare_manager(tmp_path)
    assert m.load() and m.last_complete_step == 3
    assert torch.equal(m.states["w"], torch.arange(1000, dtype=torch.float32) * 3)
    fresh = bare_manager(tmp_path / "empty", initial_load_path=str(tmp_path / "step-3"))
    (tmp_path / "empty").mkdir()
    assert fresh.load() and torch.equal(fresh.states["b"], torch.ones(10))
    assert called == []


def test_every_marked_checkpoint_has_one_line_with_its_step_time_and_folder(tmp_path, caplog, monkeypatch):
    """The final save prints no torchtitan line (its ``save`` returns before it), an async one prints it
    before anything is on disk: the line is the marker's, on rank 0, for every kind of save."""

    from torchtitan_runai.goodput.ledger import NullLedger

    monkeypatch.setattr(manager, "data_record", lambda *a: {})
    m = object.__new__(manager.RunaiCheckpointManager)
    m.folder, m.keep_latest_k, m.retiring, m.last_complete_step = str(tmp_path), 0, None, -1
    m.job_config = config()
    m.world_size = m.dp_degree = 2
    m.job_id, m.states, m.ledger = "job", {}, NullLedger()
    m.save_began = {10: (time.monotonic() - 1.5, False), 20: (time.monotonic() - 4.0, True)}
    caplog.set_level(logging.INFO)
    for step in (10, 20, 30):  # a synchronous save (final, preemption, interval), an async one, one not timed
        write_ckpt(tmp_path, step, mark=False)
        m._mark(step, "full")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint at step")]
    assert len(lines) == 3, lines
    assert re.fullmatch(rf"checkpoint at step 10 saved in 1\.\d\d s: {tmp_path}/step-10", lines[0]), lines[0]
    assert re.fullmatch(
        rf"checkpoint at step 20 saved in the background, complete 4\.\d\d s after it began: {tmp_path}/step-20",
        lines[1],
    ), lines[1]
    assert lines[2] == f"checkpoint at step 30 saved: {tmp_path}/step-30"
    assert m.save_began == {}
