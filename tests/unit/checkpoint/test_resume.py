"""torchtitan_runai.checkpoint.resume: which checkpoint resumes, schedule/world-size policy, the launcher's prestart.

Checkpoints here are real DCP checkpoints written by torch.distributed.checkpoint (one process).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ckpt_util import config, stock_ckpt, write_ckpt

from torchtitan_runai.checkpoint import folder as ckfolder
from torchtitan_runai.checkpoint import resume
from torchtitan_runai.errors import UserError


def test_schedule_change_says_what_changes():
    old = resume.schedule_of(config(steps=10))
    assert resume.schedule_changes(old, resume.schedule_of(config(steps=10)), 5) == []
    lines = resume.schedule_changes(old, resume.schedule_of(config(steps=20, warmup=4)), 5)
    text = "\n".join(lines)
    assert "training.steps 10 -> 20" in text and "lr_scheduler.warmup_steps 2 -> 4" in text
    assert "--lr_scheduler.total_steps 10" in text and "warmup now ends at step 4" in text
    # pinning total_steps keeps the schedule: only the stop step changes
    lines = resume.schedule_changes(old, resume.schedule_of(config(steps=20, total=10)), 5)
    assert not any("recomputed" in line for line in lines) and any("stops at step 20" in line for line in lines)


def test_world_size_change_of_per_rank_positions_is_refused_with_a_way_forward(tmp_path):
    found = ckfolder.examine(write_ckpt(tmp_path, 5, dp=2))  # a marker from before global positions
    assert resume.plan_resume(found, config(), 2, 2) is None
    with pytest.raises(UserError) as error:
        resume.plan_resume(found, config(), 4, 4)
    assert "2 -> 4" in error.value.line() and "initial_load_model_only" in error.value.line()


def test_already_done():
    found = ckfolder.StepFolder(10, Path("x/step-10"), True)
    assert "at or past training.steps = 10" in resume.already_done(found, 10)
    assert resume.already_done(found, 11) is None and resume.already_done(None, 1) is None


def test_prestart_reports_completion_and_writes_nothing(tmp_path):
    cfg = config(steps=10, dump=str(tmp_path))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_ckpt(folder, 10, steps=10)
    (write_ckpt(folder, 12, mark=False) / ".metadata").unlink()  # a save cut off before DCP's last write
    done = resume.prestart(cfg, {}, 2, 2)
    assert "nothing to train" in done
    assert (folder / "step-12").exists()  # the launcher only checks; the trainer moves it
    cfg.training.steps = 20
    assert resume.prestart(cfg, {}, 2, 2) is None
    # claimed only after every check has passed (ownership.hold_folder), not here
    assert not (folder / "job.json").exists() and not (folder / "lock.json").exists()
    with pytest.raises(UserError, match="world size"):
        resume.prestart(cfg, {}, 1, 1)


def test_prestart_leaves_a_missing_folder_missing(tmp_path):
    cfg = config(steps=10, dump=str(tmp_path / "new-run"))
    assert resume.prestart(cfg, {}, 2, 2) is None
    assert not (tmp_path / "new-run").exists()


def test_only_a_model_only_checkpoint_points_to_initial_load_path(tmp_path):
    stock_ckpt(tmp_path, 4, full=False)
    found = ckfolder.scan(tmp_path)
    with pytest.raises(UserError) as err:
        resume.choose(found, -1, tmp_path)
    line = err.value.line()
    assert "model weights only" in line and f"--checkpoint.initial_load_path {tmp_path / 'step-4'}" in line
    assert resume.choose(found, -1, tmp_path, initial_load=True) is None  # the user already does that
    stock_ckpt(tmp_path, 2)
    chosen = resume.choose(ckfolder.scan(tmp_path), -1, tmp_path)
    assert chosen.step == 2 and chosen.adopted  # an older full one resumes; the model-only one stays


def test_choose_examines_only_as_far_as_its_answer_needs(tmp_path):
    """One decision for every caller: the ranks' start-up (adapt_to_checkpoint) hands choose a lazy scan."""
    write_ckpt(tmp_path, 2)
    write_ckpt(tmp_path, 6)
    stock_ckpt(tmp_path, 8, full=False)
    examined = []

    def lazily():
        for step, path in ckfolder.step_folders(tmp_path):
            examined.append(step)
            yield ckfolder.examine(path, step)

    assert resume.choose(lazily(), -1, tmp_path).step == 6 and examined == [8, 6]
    examined.clear()
    assert resume.choose(lazily(), 6, tmp_path).step == 6 and examined == [8, 6]


def test_adapt_to_checkpoint_leaves_a_model_only_folder_to_the_launcher_and_the_manager(tmp_path):
    cfg = config(dump=str(tmp_path))
    stock_ckpt(tmp_path / "ckpt", 4, full=False)
    assert resume.adapt_to_checkpoint(cfg, 2) is None  # the configured batch; no error here
    with pytest.raises(UserError, match="model weights only"):
        resume.prestart(cfg, {}, 2, 2)
    cfg.checkpoint.load_step = 3
    with pytest.raises(UserError, match="step-3 does not exist"):
        resume.adapt_to_checkpoint(cfg, 2)
