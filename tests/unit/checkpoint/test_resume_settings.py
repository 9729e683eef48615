"""The job's settings kept with each checkpoint, and what a resume does with each one that differs:
refused (one line), applied from the resumed step, or kept from the checkpoint (with a line); the seed
a job drew is reused on every resume (issue 24, items 3 and 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchtitan_runai.checkpoint import folder as fd
from torchtitan_runai.checkpoint import resume as ck
from torchtitan_runai.errors import UserError
from torchtitan_runai.job import parse_job_config

DEBUG = ["--job.config_file", "train_configs/debug_model.toml"]


def saved(dump: Path, step: int = 6, settings: dict | None = None, **args) -> Path:
    """A complete checkpoint whose marker is what a debug run at world size 2 writes (with ``args``)."""
    import torch
    import torch.distributed.checkpoint as dcp

    config = parse_job_config([*DEBUG, "--job.dump_folder", str(dump), *args], world_size=2)
    config.debug.seed = 1234 if config.debug.seed is None else config.debug.seed  # as agree_on_seed leaves it
    path = dump / "checkpoint" / f"step-{step}"
    dcp.save({"w": torch.ones(4)}, checkpoint_id=str(path))
    record = fd.marker_record(step, "full", path, ck.schedule_of(config), 2, 2, "job")
    record["data"] = ck.data_record(config, 2, ck.GLOBAL_ORDER)
    record["settings"] = ck.settings_of(config) if settings is None else settings
    if settings == {}:
        del record["settings"]  # a marker from before settings were kept
    fd.mark_complete(path, record)
    return path


def resumed(dump: Path, *args: str, world_size: int = 2):
    return parse_job_config([*DEBUG, "--job.dump_folder", str(dump), *args], world_size=world_size, resume=True)


def test_the_marker_keeps_the_settings_a_resume_compares():
    config = parse_job_config(DEBUG, world_size=2)
    settings = ck.settings_of(config)
    for key in ("model.flavor", "training.seq_len", "training.dataset", "optimizer.lr", "debug.seed"):
        assert key in settings
    assert settings["training.seq_len"] == 128 and settings["optimizer.lr"] == 8e-4


def test_an_unchanged_resume_says_nothing_but_the_reused_seed(tmp_path):
    saved(tmp_path)
    config = resumed(tmp_path)
    assert config.debug.seed == 1234
    assert ck.resume_report(config) == [
        "debug.seed: the checkpoint's seed 1234 is reused (a job keeps the seed it started with)"
    ]


def test_every_changed_setting_is_named_with_its_fate(tmp_path):
    saved(tmp_path)
    config = resumed(tmp_path, "--training.steps", "40", "--optimizer.lr", "4e-4", "--training.local_batch_size", "2")
    text = "\n".join(ck.resume_report(config))
    assert "changed schedule settings, applied from step 7: training.steps 30 -> 40" in text
    assert "optimizer.lr 0.0008 -> 0.0004: applied from step 7" in text
    assert "training.local_batch_size 4 -> 2: applied from step 7, as local batch 2 × accumulation 2" in text
    assert "global batch of 8 sequences is kept from the checkpoint" in text and "initial_load_path" in text
    assert (config.training.global_batch_size, config.training.local_batch_size) == (8, 2)
    assert config.optimizer.lr == 4e-4 and config.training.steps == 40


def test_a_local_batch_that_cannot_apply_is_said_not_applied(tmp_path):
    saved(tmp_path)
    config = resumed(tmp_path, "--training.local_batch_size", "8")
    assert config.training.local_batch_size == 4  # the global batch 8 over 2 ranks
    (line,) = [x for x in ck.resume_report(config) if "local_batch_size" in x]
    assert line.startswith("training.local_batch_size 8: not applied, the run trains with local batch 4")
    assert "global batch of 8 sequences is kept" in line


def test_a_seed_set_on_resume_is_replaced_with_a_line(tmp_path):
    saved(tmp_path)
    config = resumed(tmp_path, "--debug.seed", "7")
    assert config.debug.seed == 1234
    (line,) = ck.resume_report(config)
    assert line.startswith("debug.seed 7: kept from the checkpoint, the run keeps seed 1234")
    assert resumed(tmp_path, "--debug.seed", "1234").debug.seed == 1234
    assert ck.resume_report(resumed(tmp_path, "--debug.seed", "1234")) == []


@pytest.mark.parametrize(
    "args,setting,old",
    [
        (["--training.seq_len", "256"], "training.seq_len", "128"),
        (["--model.flavor", "debugmodel_flex_attn"], "model.flavor", "'debugmodel'"),
        (["--training.dataset", "c4_test"], "training.dataset", "'local'"),
    ],
)
def test_what_a_checkpoint_fixes_is_refused_with_the_way_on(tmp_path, args, setting, old):
    saved(tmp_path)
    with pytest.raises(UserError) as error:
        resumed(tmp_path, *args)
    line = error.value.line()
    assert error.value.setting == setting and "\n" not in line
    assert f"was written with {setting} = {old}" in line or f"built with {setting} = {old}" in line
    assert f"resume it with --{setting} {old.strip(chr(39))}" in line


def test_an_old_marker_still_refuses_another_seq_len_and_says_settings_not_recorded(tmp_path):
    saved(tmp_path, settings={})
    with pytest.raises(UserError) as error:
        resumed(tmp_path, "--training.seq_len", "64")
    assert error.value.setting == "training.seq_len" and "initial_load_model_only" in error.value.line()
    config = resumed(tmp_path, "--optimizer.lr", "4e-4")
    report = ck.resume_report(config)
    assert sum("settings not recorded" in line for line in report) == 1
    assert config.debug.seed is None  # no stored seed: drawn as before, and recorded with the next checkpoint


def test_prestart_says_the_lines_once_and_refuses_like_the_parse(tmp_path):
    saved(tmp_path)
    config = resumed(tmp_path, "--training.steps", "40")
    said = []
    assert ck.prestart(config, {}, 2, 2, say=said.append) is None
    assert said == ck.resume_report(config) and "training.steps 30 -> 40" in said[0]
    assert "stops at step 40 (was 30)" in said[-2] and "seed 1234 is reused" in said[-1]
    config.training.seq_len = 64  # prestart checks on its own, too
    with pytest.raises(UserError, match="training.seq_len = 64"):
        ck.prestart(config, {}, 2, 2, say=said.append)
