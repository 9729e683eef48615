"""job: the whole config check (values, then the model, then a Hugging Face initial load), the
commands' ``--config FILE`` form, and the batch a resume keeps (``resume=True``) against a real
checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import ckpt_util
import pytest
from ckpt_util import write_ckpt

from torchtitan_runai.checkpoint import folder as ckfolder
from torchtitan_runai.checkpoint import resume
from torchtitan_runai.errors import UserError
from torchtitan_runai.job import load_job_config, parse_job_config

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "train_configs/debug_model.toml"  # debugmodel: 16 heads; local batch 4, 30 steps


def args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--job.config_file", str(DEBUG), "--job.dump_folder", str(tmp_path / "dump"), *extra]


def test_the_file_and_the_flags_are_parsed_and_kept(tmp_path):
    config = parse_job_config(args(tmp_path, "--training.steps", "7"), world_size=2)
    assert config.job.config_file == str(DEBUG)
    assert (config.model.name, config.model.flavor) == ("llama3_runai", "debugmodel")
    assert config.training.steps == 7 and config.training.local_batch_size == 4


def test_an_unknown_flavor_names_model_flavor(tmp_path):
    with pytest.raises(UserError) as err:
        parse_job_config(args(tmp_path, "--model.flavor", "9000B"), world_size=2)
    assert err.value.setting == "model.flavor" and err.value.value == "9000B"
    assert "debugmodel" in err.value.fix  # the flavors there are


def test_tensor_parallel_must_divide_the_heads(tmp_path):
    tp = ["--parallelism.data_parallel_shard_degree", "1", "--training.seq_len", "129"]  # 129: a multiple of 3
    with pytest.raises(UserError) as err:
        parse_job_config(args(tmp_path, *tp, "--parallelism.tensor_parallel_degree", "3"), world_size=3)
    assert err.value.setting == "parallelism.tensor_parallel_degree" and "n_heads (16)" in err.value.why
    config = parse_job_config(
        args(tmp_path, "--parallelism.data_parallel_shard_degree", "1", "--parallelism.tensor_parallel_degree", "2"),
        world_size=2,
    )
    assert config.parallelism.tensor_parallel_degree == 2


def test_a_hugging_face_initial_load_is_checked(tmp_path):
    hf = [
        "--checkpoint.initial_load_in_hf",
        "--checkpoint.initial_load_model_only",
        "--checkpoint.initial_load_path",
        str(tmp_path / "no-such-model"),
    ]
    with pytest.raises(UserError) as err:
        parse_job_config(args(tmp_path, *hf), world_size=2)
    assert err.value.setting == "checkpoint.initial_load_path" and "no such folder" in err.value.why


def test_load_job_config_takes_a_file_and_overrides(tmp_path):
    config = load_job_config(DEBUG, ["--training.steps", "5"])
    assert config.job.config_file == str(DEBUG) and config.training.steps == 5
    assert load_job_config(str(DEBUG)).training.steps == 30
    with pytest.raises(UserError) as err:
        load_job_config(DEBUG, ["--model.flavor", "nope"])  # the whole check, as parse_job_config
    assert err.value.setting == "model.flavor"


def test_load_job_config_names_a_missing_file(tmp_path):
    with pytest.raises(UserError) as err:
        load_job_config(tmp_path / "nope.toml")
    assert (err.value.setting, err.value.value) == ("--config", str(tmp_path / "nope.toml"))
    with pytest.raises(UserError, match="--config"):
        load_job_config(tmp_path)  # a folder is not the TOML


def global_order_ckpt(folder: Path, step: int, global_batch: int, world_size: int, dp: int) -> Path:
    """A complete checkpoint whose marker carries a global data position (what a resume may re-split)."""
    path = write_ckpt(folder, step, mark=False)
    record = ckfolder.marker_record(step, "full", path, resume.schedule_of(ckpt_util.config()), world_size, dp, "job")
    record["data"] = {
        "format": resume.GLOBAL_ORDER,
        "global_batch": global_batch,
        "local_batch": 4,
        "accumulation": global_batch // (4 * dp),
        "seq_len": 128,
        "tp": 1,
        "pp": 1,
        "cp": 1,
    }
    ckfolder.mark_complete(path, record)
    return path


def test_resume_keeps_the_checkpoints_global_batch_at_another_size(tmp_path):
    global_order_ckpt(tmp_path / "dump" / "checkpoint", 5, global_batch=8, world_size=2, dp=2)
    fresh = parse_job_config(args(tmp_path), world_size=4)
    assert (fresh.training.global_batch_size, fresh.training.local_batch_size) == (-1, 4)  # as configured
    resumed = parse_job_config(args(tmp_path), world_size=4, resume=True)
    assert (resumed.training.global_batch_size, resumed.training.local_batch_size) == (8, 2)  # 4 ranks x 2
    with pytest.raises(UserError) as err:  # 8 sequences cannot be split over 3 data-parallel ranks
        parse_job_config(args(tmp_path), world_size=3, resume=True)
    assert err.value.setting == "world size" and "cannot be split over 3" in err.value.why


def test_resume_refuses_per_rank_positions_at_another_size(tmp_path):
    write_ckpt(tmp_path / "dump" / "checkpoint", 5, dp=2)  # world size 2, per-rank data positions
    assert parse_job_config(args(tmp_path), world_size=2, resume=True).training.local_batch_size == 4
    assert parse_job_config(args(tmp_path), world_size=4).training.local_batch_size == 4  # no resume: no check
    with pytest.raises(UserError) as err:
        parse_job_config(args(tmp_path), world_size=4, resume=True)
    assert err.value.setting == "world size" and "per-rank data positions" in err.value.why
    assert (
        parse_job_config(args(tmp_path, "--checkpoint.no-enable"), world_size=4, resume=True).training.local_batch_size
        == 4
    )  # nothing to resume from


def test_a_rejected_value_is_tyros_reason_without_its_box(tmp_path):
    with pytest.raises(UserError) as err:
        parse_job_config(args(tmp_path, "--training.steps", "ten"), world_size=2)
    line = err.value.line()
    assert "Error parsing --training.steps: invalid literal for int() with base 10: 'ten'" in line
    assert not set("╭╮╰╯│─") & set(line) and "helptext" not in line and "\n" not in line


def test_a_switch_names_its_other_spelling_and_a_sectionless_key_its_sections(tmp_path):
    with pytest.raises(UserError) as err:
        parse_job_config(args(tmp_path, "--checkpoint.enable", "false"), world_size=2)
    assert err.value.fix == "write --checkpoint.no-enable"
    with pytest.raises(UserError) as err:
        parse_job_config(args(tmp_path, "--checkpoint.enable=sometimes"), world_size=2)
    assert "--checkpoint.enable (on) or --checkpoint.no-enable (off)" in err.value.fix
    with pytest.raises(UserError) as err:
        parse_job_config(args(tmp_path, "--seq-len", "64"), world_size=2)
    assert "--training.seq_len" in err.value.fix
    # the switches as written stay accepted
    config = parse_job_config(args(tmp_path, "--checkpoint.no-enable", "--metrics.enable_tensorboard"), world_size=2)
    assert config.checkpoint.enable is False and config.metrics.enable_tensorboard is True
