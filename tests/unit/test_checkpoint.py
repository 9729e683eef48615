"""torchtitan_runai.checkpoint: completeness, resume choice, schedule/world-size policy, ownership.

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

from torchtitan_runai import checkpoint as ck
from torchtitan_runai.errors import UserError


def write_ckpt(folder: Path, step: int, mark: bool = True, dp: int = 2, steps: int = 10) -> Path:
    path = folder / f"step-{step}"
    dcp.save({"w": torch.arange(1000, dtype=torch.float32) * step, "b": torch.ones(10)}, checkpoint_id=str(path))
    if mark:
        ck.mark_complete(path, ck.marker_record(step, "full", path, config(steps=steps), 2, dp, "job"))
    return path


def config(steps=10, warmup=2, total=None, folder="ckpt", dump="."):
    return SimpleNamespace(
        training=SimpleNamespace(steps=steps),
        lr_scheduler=SimpleNamespace(warmup_steps=warmup, total_steps=total, decay_ratio=None,
                                     decay_type="linear", min_lr_factor=0.0),
        job=SimpleNamespace(dump_folder=dump),
        checkpoint=SimpleNamespace(enable=True, folder=folder, load_step=-1),
        resilience=SimpleNamespace(take_over_folder=False),
    )


def test_complete_checkpoint_is_recognised(tmp_path):
    path = write_ckpt(tmp_path, 5)
    found = ck.inspect(path)
    assert found.complete and found.resumable and found.step == 5
    marker = json.loads((path / ck.MARKER).read_text())
    assert marker["files"][".metadata"] > 0 and marker["dp_degree"] == 2


@pytest.mark.parametrize("damage, why", [
    (lambda p: (p / ck.MARKER).unlink(), "no completion marker"),
    (lambda p: (p / ".metadata").unlink(), "no .metadata"),
    (lambda p: (p / ".metadata").write_bytes(b""), ".metadata unreadable"),
    (lambda p: (p / ".metadata").write_bytes(b"garbage"), ".metadata unreadable"),
    (lambda p: (p / ck.MARKER).write_text("{"), "unreadable completion marker"),
    (lambda p: next(p.glob("*.distcp")).unlink(), "is missing"),
    (lambda p: os.truncate(next(p.glob("*.distcp")), 10), "truncated"),
])
def test_damaged_checkpoints_are_incomplete(tmp_path, damage, why):
    path = write_ckpt(tmp_path, 5)
    damage(path)
    found = ck.inspect(path)
    assert not found.complete and why in found.why


def test_newest_complete_wins_and_incomplete_are_quarantined_not_deleted(tmp_path):
    write_ckpt(tmp_path, 5)
    write_ckpt(tmp_path, 10)
    write_ckpt(tmp_path, 15, mark=False)
    found = ck.scan(tmp_path)
    assert [f.step for f in found] == [15, 10, 5]
    assert ck.newest_resumable(found).step == 10
    moved = ck.quarantine(found[0], tmp_path)
    assert moved.parent.name == ck.QUARANTINE and (moved / ".metadata").exists()
    assert [s for s, _ in ck.step_folders(tmp_path)] == [10, 5]
    with pytest.raises(AssertionError):
        ck.quarantine(found[1], tmp_path)  # a complete checkpoint is never moved


def test_model_only_checkpoint_is_not_resumed(tmp_path):
    write_ckpt(tmp_path, 5)
    path = write_ckpt(tmp_path, 10)
    rec = json.loads((path / ck.MARKER).read_text())
    ck.mark_complete(path, {**rec, "kind": "model-only"})
    assert ck.newest_resumable(ck.scan(tmp_path)).step == 5


def test_marker_write_is_atomic(tmp_path):
    ck.write_json_atomic(tmp_path / "x.json", {"a": 1})
    ck.write_json_atomic(tmp_path / "x.json", {"a": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_schedule_change_says_what_changes():
    old = ck.schedule_of(config(steps=10))
    assert ck.schedule_changes(old, ck.schedule_of(config(steps=10)), 5) == []
    lines = ck.schedule_changes(old, ck.schedule_of(config(steps=20, warmup=4)), 5)
    text = "\n".join(lines)
    assert "training.steps 10 -> 20" in text and "lr_scheduler.warmup_steps 2 -> 4" in text
    assert "--lr_scheduler.total_steps 10" in text and "warmup now ends at step 4" in text
    # pinning total_steps keeps the schedule: only the stop step changes
    lines = ck.schedule_changes(old, ck.schedule_of(config(steps=20, total=10)), 5)
    assert not any("recomputed" in line for line in lines) and any("stops at step 20" in line for line in lines)


def test_world_size_change_is_refused_with_a_way_forward(tmp_path):
    found = ck.inspect(write_ckpt(tmp_path, 5, dp=2))
    assert ck.world_size_error(found, 2, 2) is None
    error = ck.world_size_error(found, 4, 4)
    assert isinstance(error, UserError)
    assert "2 -> 4" in error.line() and "initial_load_model_only" in error.line()


def test_already_done():
    found = ck.Found(10, Path("x/step-10"), True)
    assert "at or past training.steps = 10" in ck.already_done(found, 10)
    assert ck.already_done(found, 11) is None and ck.already_done(None, 1) is None


def test_job_identity_and_folder_ownership(tmp_path):
    folder = tmp_path / "ckpt"
    assert ck.claim_folder(folder, {"JOB_UUID": "u1", "JOB_NAME": "n"}) == "u1"
    assert ck.claim_folder(folder, {"JOB_UUID": "u1"}) == "u1"  # restart: stale lock is fine
    with pytest.raises(UserError, match="belongs to another job"):
        ck.claim_folder(folder, {"JOB_UUID": "u2"})
    with pytest.raises(UserError, match="take_over_folder"):
        ck.claim_folder(folder, {})
    assert ck.claim_folder(folder, {"JOB_UUID": "u2"}, take_over=True) == "u2"
    assert json.loads((folder / ck.OWNER).read_text())["previous"]["job"] == "u1"


def test_job_without_identity_chooses_one_and_keeps_it(tmp_path):
    first = ck.claim_folder(tmp_path, {})
    assert first.startswith("chosen-")
    assert ck.claim_folder(tmp_path, {}) == first
    with pytest.raises(UserError):
        ck.claim_folder(tmp_path, {"JOB_NAME": "named"})


def test_prestart_reports_completion_and_incomplete(tmp_path):
    cfg = config(steps=10, dump=str(tmp_path))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_ckpt(folder, 10, steps=10)
    write_ckpt(folder, 12, mark=False)
    warnings = []
    done = ck.prestart(cfg, {}, 2, 2, warn=warnings.append)
    assert "nothing to train" in done and any("incomplete checkpoint" in w for w in warnings)
    assert (folder / "step-12").exists()  # the launcher only reports; the trainer moves it
    cfg.training.steps = 20
    assert ck.prestart(cfg, {}, 2, 2, warn=warnings.append) is None
    assert any("resuming from step 10" in w for w in warnings)
    with pytest.raises(UserError, match="world size"):
        ck.prestart(cfg, {}, 1, 1, warn=warnings.append)


def test_full_folder_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    write_ckpt(folder, 5)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: SimpleNamespace(free=10, total=100, used=90))
    with pytest.raises(UserError, match="GiB free"):
        ck.check_writable(folder)


def test_rng_state_round_trips_through_dcp(tmp_path):
    rng = ck.RngState(rank=0)
    torch.manual_seed(7)
    torch.rand(3)
    dcp.save({"rng": rng.state_dict()}, checkpoint_id=str(tmp_path / "step-1"))
    expected = torch.rand(5)
    torch.manual_seed(99)  # what a restarted process would have: the RNG from the seed
    state = {"rng": rng.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "step-1"))
    rng.load_state_dict(state["rng"])
    assert torch.equal(torch.rand(5), expected)
    assert "rng.rank0.cpu" in ck.saved_keys(tmp_path / "step-1")
