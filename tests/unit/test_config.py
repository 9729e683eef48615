"""Every shipped config parses and validates; config mistakes become one UserError naming the setting."""

import shutil
from pathlib import Path

import pytest

from torchtitan_runai import TRAIN_SPEC_NAME, upstream
from torchtitan_runai.config import torchtitan_args
from torchtitan_runai.errors import UserError
from torchtitan_runai.job import parse_job_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "train_configs").glob("*.toml"))
WORLD = {"debug_model.toml": 2, "llama3_8b.toml": 16, "llama3_70b.toml": 32, "llama3_405b.toml": 64}


def test_the_four_recipes_are_shipped():
    assert {c.name for c in CONFIGS} >= set(WORLD)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses_and_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = parse_job_config(["--job.config_file", str(path)], world_size=WORLD.get(path.name, 8))
    assert config.model.name == TRAIN_SPEC_NAME
    assert config.checkpoint.enable and not config.checkpoint.last_save_model_only  # resumable defaults
    assert config.job.custom_config_module == "torchtitan_runai.config"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_header_says_purpose_and_launch_command(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert header and header[0].startswith(f"# {path.name}:"), "first line names the file and its purpose"
    assert "run_llama_train.sh" in text or "make train" in text, "header shows the exact launch command"


def test_cluster_recipes_keep_the_seeds_intent(monkeypatch):
    monkeypatch.chdir(REPO)
    c8 = parse_job_config(["--job.config_file", "train_configs/llama3_8b.toml"], world_size=16)
    c70 = parse_job_config(["--job.config_file", "train_configs/llama3_70b.toml"], world_size=16)
    c405 = parse_job_config(["--job.config_file", "train_configs/llama3_405b.toml"], world_size=64)
    assert c8.parallelism.tensor_parallel_degree == 1 and c8.parallelism.data_parallel_shard_degree == -1
    assert c70.parallelism.tensor_parallel_degree == 8 and c70.activation_checkpoint.mode == "full"
    assert c405.parallelism.tensor_parallel_degree == 8 and c405.compile.enable
    assert "quantize.linear.float8" in c405.model.converters and c405.parallelism.enable_async_tensor_parallel


def test_paths_resolve_against_the_working_directory_not_the_config_folder(tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "debug.toml"
    moved.parent.mkdir()
    shutil.copy(REPO / "train_configs" / "debug_model.toml", moved)
    monkeypatch.chdir(REPO)
    config = parse_job_config(["--job.config_file", str(moved)], world_size=2)
    assert config.model.hf_assets_path == "./assets/rehearsal/tokenizer"
    assert Path(config.model.hf_assets_path).is_dir()  # found from the repo root, where runs start


def test_cli_overrides_win_over_toml(monkeypatch):
    monkeypatch.chdir(REPO)
    config = parse_job_config(["--job.config_file", "train_configs/debug_model.toml", "--training.steps", "7"])
    assert config.training.steps == 7


def test_custom_module_is_added_once():
    assert torchtitan_args(["--x"]) == ["--x", "--job.custom_config_module=torchtitan_runai.config"]
    assert (
        torchtitan_args(["--job.custom_config_module=torchtitan_runai.config"]).count(
            "--job.custom_config_module=torchtitan_runai.config"
        )
        == 1
    )


def write(tmp_path, body: str) -> str:
    base = (REPO / "train_configs" / "debug_model.toml").read_text()
    path = tmp_path / "c.toml"
    path.write_text(base + "\n" + body)
    return str(path)


@pytest.mark.parametrize(
    "extra, setting, words",
    [
        ("[training2]\nsteps = 1", "training2", "unknown config section"),
        ("[debug]\nseeed = 1", "debug.seeed", "did you mean 'debug.seed'"),
        ("[debug]\nseed = 4294967296", "debug.seed", "[0, 2**32)"),
        ("[debug]\nseed = -1", "debug.seed", "[0, 2**32)"),
        ('[comm]\ninit_timeout_seconds = "ten"', "comm.init_timeout_seconds", "wrong type"),
        ("[profiling]\nprofile_freq = 2.5", "profiling.profile_freq", "wrong type"),
        ('[comm]\nmode = "fast"', "comm.mode", "one of"),
    ],
)
def test_schema_errors(tmp_path, monkeypatch, extra, setting, words):
    monkeypatch.chdir(REPO)
    with pytest.raises(UserError) as e:
        parse_job_config(["--job.config_file", write(tmp_path, extra)])
    assert e.value.setting == setting
    assert words in e.value.line()


@pytest.mark.parametrize(
    "args, setting",
    [
        (["--training.steps", "0"], "training.steps"),
        (["--training.seq_len", "127", "--parallelism.tensor_parallel_degree", "2"], "training.seq_len"),
        (["--training.seq_len", "140000"], "training.seq_len"),
        (["--model.flavor", "9B"], "model.flavor"),
        (["--parallelism.data_parallel_replicate_degree", "3"], "parallelism"),
        (["--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2"], "parallelism"),
        (["--checkpoint.keep_latest_k", "1"], "checkpoint.keep_latest_k"),
        (["--training.global_batch_size", "6"], "training.global_batch_size"),
        (["--training.stepz", "3"], "command line"),
        # issue 24: optimizer and schedule values, refused before any worker builds them
        (["--optimizer.lr", "-1e-4"], "optimizer.lr"),
        (["--optimizer.lr", "0"], "optimizer.lr"),
        (["--optimizer.lr", "nan"], "optimizer.lr"),
        (["--optimizer.weight_decay", "-0.1"], "optimizer.weight_decay"),
        (["--optimizer.eps", "0"], "optimizer.eps"),
        (["--optimizer.eps", "-1e-8"], "optimizer.eps"),
        (["--optimizer.beta2", "1.0"], "optimizer.beta2"),
        (["--lr_scheduler.total_steps", "0"], "lr_scheduler.total_steps"),
        (["--lr_scheduler.warmup_steps", "-1"], "lr_scheduler.warmup_steps"),
        (["--lr_scheduler.decay_ratio", "1.5"], "lr_scheduler.decay_ratio"),
        (["--lr_scheduler.decay_ratio", "-0.1"], "lr_scheduler.decay_ratio"),
        (["--lr_scheduler.min_lr_factor", "-0.5"], "lr_scheduler.min_lr_factor"),
    ],
)
def test_value_errors(monkeypatch, args, setting):
    monkeypatch.chdir(REPO)
    with pytest.raises(UserError) as e:
        parse_job_config(["--job.config_file", "train_configs/debug_model.toml", *args], world_size=2)
    assert e.value.setting == setting


def test_warmup_longer_than_the_run_is_one_note_naming_both_numbers_and_the_fix(monkeypatch):
    from torchtitan_runai.config import warmup_note

    monkeypatch.chdir(REPO)
    base = ["--job.config_file", "train_configs/debug_model.toml"]  # the debug recipe warms up for 5
    line = warmup_note(parse_job_config([*base, "--training.steps", "3"]))
    assert "lr_scheduler.warmup_steps = 5" in line and "training.steps = 3" in line and "at most 3" in line
    line = warmup_note(parse_job_config([*base, "--lr_scheduler.total_steps", "4"]))
    assert "lr_scheduler.total_steps = 4" in line
    assert warmup_note(parse_job_config([*base, "--training.steps", "5"])) is None


def test_schedule_edges_that_are_fine(monkeypatch):
    monkeypatch.chdir(REPO)
    base = ["--job.config_file", "train_configs/debug_model.toml"]
    # warmup as long as the run, a schedule longer than the run, a constant rate and no decay
    parse_job_config([*base, "--training.steps", "5"], world_size=2)
    parse_job_config([*base, "--training.steps", "3", "--lr_scheduler.total_steps", "30"], world_size=2)
    parse_job_config([*base, "--lr_scheduler.decay_ratio", "0", "--lr_scheduler.min_lr_factor", "1"], world_size=2)
    parse_job_config([*base, "--optimizer.weight_decay", "0", "--optimizer.beta1", "0"], world_size=2)


def test_toml_syntax_error_names_the_line(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = tmp_path / "bad.toml"
    path.write_text("[training]\nsteps = = 3\n")
    with pytest.raises(UserError) as e:
        parse_job_config(["--job.config_file", str(path)])
    assert e.value.setting == "CONFIG_FILE" and "line 2" in e.value.line()


def test_custom_import_can_add_flavors_before_they_are_checked(tmp_path, monkeypatch):
    # torchtitan imports experimental.custom_import before it looks the model up; so must we
    (tmp_path / "my_flavors.py").write_text(
        "import dataclasses\n"
        "from torchtitan.models.llama3 import llama3_args\n"
        "llama3_args.setdefault('8B_4layers', dataclasses.replace(llama3_args['8B'], n_layers=4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(REPO)
    base = ["--job.config_file", str(REPO / "train_configs/llama3_8b.toml"), "--model.flavor", "8B_4layers"]
    with pytest.raises(UserError) as e:
        parse_job_config(base, world_size=16)
    assert e.value.setting == "model.flavor"
    try:
        config = parse_job_config(base + ["--experimental.custom_import", "my_flavors"], world_size=16)
        assert config.model.flavor == "8B_4layers"
    finally:  # torchtitan's table is this process's: later tests compare it with its source
        upstream.llama3.llama3_args.pop("8B_4layers", None)


def test_custom_import_that_cannot_be_imported_is_named(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(UserError) as e:
        parse_job_config(
            [
                "--job.config_file",
                str(REPO / "train_configs/llama3_8b.toml"),
                "--experimental.custom_import",
                "no_such_module_here",
            ],
            world_size=16,
        )
    assert e.value.setting == "experimental.custom_import" and "PYTHONPATH" in e.value.line()


def test_nested_section_flags_such_as_float8_are_known(monkeypatch):
    monkeypatch.chdir(REPO)
    base = ["--job.config_file", str(REPO / "train_configs/llama3_8b.toml")]
    config = parse_job_config(
        base + ["--model.converters", "quantize.linear.float8", "--quantize.linear.float8.filter_fqns", "output"],
        world_size=16,
    )
    assert config.quantize.linear.float8.filter_fqns == ["output"]
    with pytest.raises(UserError) as e:
        parse_job_config(base + ["--quantize.linear.float8.filter_fqn", "output"], world_size=16)
    assert "did you mean --quantize.linear.float8.filter_fqns" in e.value.line()


def test_config_with_a_byte_order_mark_is_accepted(tmp_path):
    # Windows editors save UTF-8 with a BOM; main said "Invalid statement (line 1, column 1)"
    text = (REPO / "train_configs" / "debug_model.toml").read_bytes()
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + text.replace(b"\n", b"\r\n"))
    config = parse_job_config(["--job.config_file", str(bom)])
    assert config.training.steps == 30 and config.model.name == "llama3_runai"
