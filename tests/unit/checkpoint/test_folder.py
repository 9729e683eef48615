"""torchtitan_runai.checkpoint.folder: completeness, quarantine, atomic markers, room for a checkpoint.

Checkpoints here are real DCP checkpoints written by torch.distributed.checkpoint (one process).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from ckpt_util import stock_ckpt, write_ckpt

from torchtitan_runai.checkpoint import folder as ckfolder
from torchtitan_runai.errors import UserError


def test_complete_checkpoint_is_recognised(tmp_path):
    path = write_ckpt(tmp_path, 5)
    found = ckfolder.examine(path)
    assert found.complete and found.resumable and found.step == 5
    marker = json.loads((path / ckfolder.MARKER).read_text())
    assert marker["files"][".metadata"] > 0 and marker["dp_degree"] == 2


@pytest.mark.parametrize(
    "damage, why",
    [
        (
            lambda p: [(p / ckfolder.MARKER).unlink(), (p / ".metadata").unlink()],
            "no completion marker and no .metadata",
        ),
        (lambda p: (p / ".metadata").unlink(), "no .metadata"),
        (lambda p: (p / ".metadata").write_bytes(b""), ".metadata unreadable"),
        (lambda p: (p / ".metadata").write_bytes(b"garbage"), ".metadata unreadable"),
        (lambda p: (p / ckfolder.MARKER).write_text("{"), "unreadable completion marker"),
        (lambda p: next(p.glob("*.distcp")).unlink(), "is missing"),
        (lambda p: os.truncate(next(p.glob("*.distcp")), 10), "truncated"),
    ],
)
def test_damaged_checkpoints_are_incomplete(tmp_path, damage, why):
    path = write_ckpt(tmp_path, 5)
    damage(path)
    found = ckfolder.examine(path)
    assert not found.complete and why in found.why


def test_newest_complete_wins_and_incomplete_are_quarantined_not_deleted(tmp_path):
    write_ckpt(tmp_path, 5)
    write_ckpt(tmp_path, 10)
    (write_ckpt(tmp_path, 15, mark=False) / ".metadata").unlink()  # cut off before DCP's last write
    found = ckfolder.scan(tmp_path)
    assert [f.step for f in found] == [15, 10, 5]
    assert ckfolder.newest_resumable(found).step == 10
    moved = ckfolder.quarantine(found[0], tmp_path)
    assert moved.parent.name == ckfolder.QUARANTINE and list(moved.glob("*.distcp"))
    assert [s for s, _ in ckfolder.step_folders(tmp_path)] == [10, 5]
    with pytest.raises(AssertionError):
        ckfolder.quarantine(found[1], tmp_path)  # a complete checkpoint is never moved


def test_model_only_checkpoint_is_not_resumed(tmp_path):
    write_ckpt(tmp_path, 5)
    path = write_ckpt(tmp_path, 10)
    rec = json.loads((path / ckfolder.MARKER).read_text())
    ckfolder.mark_complete(path, {**rec, "kind": "model-only"})
    assert ckfolder.newest_resumable(ckfolder.scan(tmp_path)).step == 5


def test_full_folder_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    write_ckpt(folder, 5)
    monkeypatch.setattr(ckfolder.shutil, "disk_usage", lambda p: SimpleNamespace(free=10, total=100, used=90))
    with pytest.raises(UserError, match="GiB free"):
        ckfolder.check_writable(folder)


# --- adopting checkpoints written without our marker (stock torchtitan) ------------------------


def test_a_stock_full_checkpoint_is_adopted_as_resumable(tmp_path):
    stock_ckpt(tmp_path, 4)
    found = ckfolder.examine(tmp_path / "step-4")
    assert found.complete and found.resumable and found.adopted
    assert found.record["dp_degree"] == 2 and found.kind == "full"
    assert not (tmp_path / "step-4" / ckfolder.MARKER).exists()  # verified, not written to


def test_a_stock_model_only_checkpoint_is_complete_but_not_resumable(tmp_path):
    stock_ckpt(tmp_path, 4, full=False)
    found = ckfolder.examine(tmp_path / "step-4")
    assert found.complete and not found.resumable and found.kind == "model-only"
    with pytest.raises(AssertionError):
        ckfolder.quarantine(found, tmp_path)  # never moved aside


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda p: (p / ".metadata").unlink(), "no completion marker and no .metadata"),
        (lambda p: os.truncate(next(p.glob("*.distcp")), 10), "truncated"),
        (lambda p: (p / ".metadata").write_bytes(b"garbage"), ".metadata unreadable"),
    ],
)
def test_a_damaged_stock_checkpoint_is_not_adopted(tmp_path, damage, why):
    path = stock_ckpt(tmp_path, 4)
    damage(path)
    found = ckfolder.examine(path)
    assert not found.complete and why in found.why
