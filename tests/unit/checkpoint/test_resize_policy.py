"""The resume policy for a changed data-parallel size: the global batch is kept, the local batch and
accumulation adapt, and what cannot be kept is one clear error."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from torchtitan_runai.checkpoint import folder as fd
from torchtitan_runai.checkpoint import resume as ck
from torchtitan_runai.errors import UserError


def config(local_batch=2, global_batch=-1, tp=1, pp=1, cp=1, seq_len=128):
    return SimpleNamespace(
        training=SimpleNamespace(local_batch_size=local_batch, global_batch_size=global_batch, seq_len=seq_len),
        parallelism=SimpleNamespace(tensor_parallel_degree=tp, pipeline_parallel_degree=pp, context_parallel_degree=cp),
    )


def found(dp=2, world=2, step=10, data_format="lanes-1", global_batch=8, **data):
    record = {"dp_degree": dp, "world_size": world}
    if data_format is not None:
        record["data"] = {"format": data_format, "global_batch": global_batch, "tp": 1, "pp": 1, "cp": 1, **data}
    return fd.StepFolder(step, Path(f"/ckpt/step-{step}"), True, record=record)


@pytest.mark.parametrize(
    "g,dp,local,expected",
    [
        (8, 2, 4, (4, 1)),
        (8, 1, 4, (4, 2)),
        (8, 4, 4, (2, 1)),
        (8, 8, 4, (1, 1)),
        (12, 2, 4, (3, 2)),
        (12, 3, 8, (4, 1)),
        (8, 3, 4, None),
        (6, 4, 1, None),
    ],
)
def test_split_batch_keeps_the_global_batch_and_never_grows_the_local_batch(g, dp, local, expected):
    got = ck.split_batch(g, dp, local)
    assert got == expected
    if got:
        assert got[0] * got[1] * dp == g and got[0] <= local


def test_a_smaller_size_accumulates_and_logs_one_line():
    plan = ck.plan_resume(found(dp=2, global_batch=8), config(local_batch=4), world_size=1, dp_degree=1)
    assert (plan.local_batch, plan.accumulation, plan.global_batch) == (4, 2, 8)
    assert plan.changed and plan.position == 80
    assert plan.line() == (
        "resuming at data-parallel 1 (checkpoint written at 2): global batch 8 kept, local batch "
        "4 × accumulation 2, data position 80 sequences (10,240 tokens)"
    )
    cfg = config(local_batch=4)
    ck.apply_plan(plan, cfg)
    assert (cfg.training.global_batch_size, cfg.training.local_batch_size) == (8, 4)


def test_a_larger_size_lowers_the_local_batch():
    plan = ck.plan_resume(found(dp=2, global_batch=8), config(local_batch=4), world_size=8, dp_degree=8)
    assert (plan.local_batch, plan.accumulation) == (1, 1)


def test_the_same_size_keeps_the_recorded_global_batch():
    plan = ck.plan_resume(found(dp=2, global_batch=8), config(local_batch=4), world_size=2, dp_degree=2)
    assert not plan.changed and (plan.global_batch, plan.local_batch, plan.accumulation) == (8, 4, 1)


def test_a_size_that_does_not_divide_the_global_batch_names_the_sizes_that_do():
    with pytest.raises(UserError) as error:
        ck.plan_resume(found(dp=2, world=2, global_batch=8), config(), world_size=3, dp_degree=3)
    line = error.value.line()
    assert "world size = '2 -> 3'" in line and "global batch of 8 sequences" in line
    assert "1 (world size 1), 2 (world size 2), 4 (world size 4), 8 (world size 8)" in line


def test_another_explicit_global_batch_is_refused():
    with pytest.raises(UserError, match="training.global_batch_size = 16"):
        ck.plan_resume(found(global_batch=8), config(global_batch=16), world_size=4, dp_degree=4)
    assert ck.plan_resume(found(global_batch=8), config(global_batch=8), world_size=4, dp_degree=4).local_batch == 2


@pytest.mark.parametrize(
    "setting,kwargs",
    [
        ("tensor_parallel_degree", {"tp": 2}),
        ("pipeline_parallel_degree", {"pp": 2}),
        ("context_parallel_degree", {"cp": 2}),
    ],
)
def test_changed_model_parallel_degrees_are_refused(setting, kwargs):
    with pytest.raises(UserError, match=f"parallelism.{setting} = 2.*written with {setting} = 1"):
        ck.plan_resume(found(dp=2, world=2), config(**kwargs), world_size=4, dp_degree=2)


@pytest.mark.parametrize("setting, key", [("tensor_parallel_degree", "tp"), ("pipeline_parallel_degree", "pp")])
def test_a_changed_layout_names_the_model_only_route_with_its_exact_flags(setting, key):
    # issue 22: a TP 2 checkpoint refused at FSDP 4 said only "set it back"; its weights carry over
    # with an initial load into a new folder (tests/integration/test_layout_change.py runs that route)
    with pytest.raises(UserError) as error:
        ck.plan_resume(found(dp=2, world=4, **{key: 2}), config(), world_size=4, dp_degree=4)
    assert error.value.setting == f"parallelism.{setting}" and error.value.value == 1
    assert error.value.fix == (
        f"resume it at the checkpoint's layout: --parallelism.{setting} 2; or continue from its weights at this "
        "layout in a new folder: --checkpoint.folder <new> --checkpoint.initial_load_path /ckpt/step-10 "
        "--checkpoint.initial_load_model_only (optimizer state and data position start afresh)"
    )
    spaced = fd.StepFolder(10, Path("/my ckpt/step-10"), True, record=found(dp=2, world=4, **{key: 2}).record)
    with pytest.raises(UserError, match="--checkpoint.initial_load_path '/my ckpt/step-10' "):
        ck.plan_resume(spaced, config(), world_size=4, dp_degree=4)  # the flags paste into a shell as printed


def test_an_old_marker_compares_gpus_per_replica():
    old = found(dp=2, world=4, data_format=None)  # tp x pp x cp = 2, before "data" was recorded
    with pytest.raises(UserError, match="tensor x pipeline x context parallel = 2") as error:
        ck.plan_resume(old, config(), world_size=4, dp_degree=4)
    assert "--checkpoint.initial_load_path /ckpt/step-10 --checkpoint.initial_load_model_only" in error.value.fix


def test_per_rank_positions_resume_at_their_size_only():
    for old in (found(data_format=None), found(data_format="per-rank")):
        assert ck.plan_resume(old, config(), world_size=2, dp_degree=2) is None
        with pytest.raises(UserError) as error:
            ck.plan_resume(old, config(), world_size=1, dp_degree=1)
        assert "world size = '2 -> 1'" in error.value.line() and "initial_load_model_only" in error.value.line()


def test_data_record_is_what_a_resume_needs():
    rec = ck.data_record(config(local_batch=2, global_batch=8, tp=2), dp_degree=2, data_format="lanes-1")
    assert rec == {
        "format": "lanes-1",
        "global_batch": 8,
        "local_batch": 2,
        "accumulation": 2,
        "seq_len": 128,
        "tp": 2,
        "pp": 1,
        "cp": 1,
    }


def lanes_checkpoint(dump: Path, step: int, dp: int, global_batch: int, world: int | None = None) -> Path:
    """A complete checkpoint on disk whose marker says: written at ``dp`` with global batch G."""
    import torch
    import torch.distributed.checkpoint as dcp

    path = dump / "checkpoint" / f"step-{step}"
    dcp.save({"w": torch.ones(10)}, checkpoint_id=str(path))
    record = {
        "step": step,
        "kind": "full",
        "world_size": world or dp,
        "dp_degree": dp,
        "schedule": {},
        "files": {p.name: p.stat().st_size for p in path.iterdir()},
        "data": {
            "format": "lanes-1",
            "global_batch": global_batch,
            "local_batch": global_batch // dp,
            "accumulation": 1,
            "seq_len": 8192,
            "tp": 1,
            "pp": 1,
            "cp": 1,
        },
    }
    fd.mark_complete(path, record)
    return path


def test_parse_for_a_resume_takes_the_checkpoints_batch(tmp_path):
    from torchtitan_runai.job import parse_job_config

    lanes_checkpoint(tmp_path, 100, dp=16, global_batch=16)
    args = ["--job.config_file", "train_configs/llama3_8b.toml", "--job.dump_folder", str(tmp_path)]
    as_configured = parse_job_config(args, world_size=8)
    assert (as_configured.training.global_batch_size, as_configured.training.local_batch_size) == (-1, 1)
    resumed = parse_job_config(args, world_size=8, resume=True)
    assert (resumed.training.global_batch_size, resumed.training.local_batch_size) == (16, 1)
    with pytest.raises(UserError, match="world size = '16 -> 24'"):
        parse_job_config(args, world_size=24, resume=True)
    # an explicit global batch that the configured local batch no longer fits at 32 ranks
    explicit = [*args, "--training.global_batch_size", "16", "--training.local_batch_size", "2"]
    with pytest.raises(UserError, match="training.global_batch_size = 16"):
        parse_job_config(explicit, world_size=32)
    resumed = parse_job_config(explicit, world_size=16, resume=True)
    assert (resumed.training.global_batch_size, resumed.training.local_batch_size) == (16, 1)


def test_preflight_checks_the_memory_fit_at_the_resumed_batch(tmp_path, capsys):
    from torchtitan_runai.launcher import preflight

    lanes_checkpoint(tmp_path, 100, dp=16, global_batch=64)  # 2 nodes x 8, local batch 4
    argv = [
        "--config",
        "train_configs/llama3_8b.toml",
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--dry-run",
        "--job.dump_folder",
        str(tmp_path),
        "--training.local_batch_size",
        "4",
    ]
    preflight.main(argv)
    out = capsys.readouterr().out
    assert (
        "resuming at data-parallel 8 (checkpoint written at 16): global batch 64 kept, local batch 4 × "
        "accumulation 2, data position 6400 sequences"
    ) in out
    preflight.main([*argv[:3], "4", *argv[4:]])  # 4 nodes: the local batch drops to 2
    out = capsys.readouterr().out
    assert "local batch 2 × accumulation 1" in out
