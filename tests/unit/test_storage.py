"""OUTPUT_DIR policy, checkpoint sizes and retention (torchtitan_runai.storage)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from torchtitan_runai import storage
from torchtitan_runai.errors import UserError


def test_output_dir_moves_dump_checkpoints_tb_and_hf_cache_together():
    paths = storage.resolve_storage({"OUTPUT_DIR": "/mnt/pvc/"}, "./outputs", "checkpoint", "tb")
    assert paths.dump_folder == "/mnt/pvc"
    assert paths.checkpoint_folder == "/mnt/pvc/checkpoint"
    assert paths.tensorboard_folder == "/mnt/pvc/tb"
    assert paths.hf_home == "/mnt/pvc/.cache/huggingface"
    assert paths.train_overrides() == ["--job.dump_folder=/mnt/pvc"]
    assert paths.env_updates() == {"HF_HOME": "/mnt/pvc/.cache/huggingface"}


def test_without_output_dir_the_config_decides_and_hf_default_is_kept():
    paths = storage.resolve_storage({}, "./runs/a", "ckpt", "board")
    assert (paths.dump_folder, paths.checkpoint_folder, paths.tensorboard_folder) == (
        "./runs/a",
        "./runs/a/ckpt",
        "./runs/a/board",
    )
    assert paths.hf_home is None and paths.env_updates() == {}


def test_explicit_hf_home_wins():
    paths = storage.resolve_storage({"OUTPUT_DIR": "/o", "HF_HOME": "/cache/hf"})
    assert paths.hf_home == "/cache/hf"


def test_defaults_are_torchtitans():
    paths = storage.resolve_storage({"OUTPUT_DIR": "/o"})
    assert paths.checkpoint_folder == "/o/checkpoint" and paths.tensorboard_folder == "/o/tb"


@pytest.mark.parametrize(
    "env,kwargs,setting",
    [
        ({"OUTPUT_DIR": "outputs"}, {}, "OUTPUT_DIR"),
        ({"OUTPUT_DIR": "/o"}, {"checkpoint_folder": "/elsewhere"}, "checkpoint.folder"),
        ({"OUTPUT_DIR": "/o"}, {"tb_folder": "/tmp/tb"}, "metrics.save_tb_folder"),
    ],
)
def test_paths_that_would_leave_the_pvc_are_user_errors(env, kwargs, setting):
    with pytest.raises(UserError) as err:
        storage.resolve_storage(env, **kwargs)
    assert err.value.setting == setting


def test_documented_checkpoint_sizes():
    # the numbers docs/cluster.md quotes: 8B ~ 100 GB, 70B ~ 1 TB (weights + AdamW state, fp32)
    assert 90e9 < storage.checkpoint_bytes("8B") < 100e9
    assert 0.8e12 < storage.checkpoint_bytes("70B") < 1.0e12
    assert 4.5e12 < storage.checkpoint_bytes("405B") < 5e12
    with pytest.raises(UserError):
        storage.checkpoint_bytes("debugmodel")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("10Ti", 10 * 1024**4),
        ("500Gi", 500 * 1024**3),
        ("2T", 2 * 10**12),
        ("1.5Ti", int(1.5 * 1024**4)),
        ("123", 123),
        ("2e12", 2 * 10**12),
    ],
)
def test_parse_size(text, expected):
    assert storage.parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(UserError):
        storage.parse_size("lots")


def test_keep_latest_k_recommendation_fits_k_plus_one_and_is_capped():
    eight, seventy, big = (storage.checkpoint_bytes(f) for f in ("8B", "70B", "405B"))
    ti = 1024**4
    assert storage.recommend_keep_latest_k(10 * ti, eight) == 10  # capped
    assert storage.recommend_keep_latest_k(1 * ti, eight) == 9
    assert storage.recommend_keep_latest_k(10 * ti, seventy) == 10
    assert storage.recommend_keep_latest_k(20 * ti, big) == 3
    for pvc, size in ((1 * ti, eight), (10 * ti, seventy), (20 * ti, big)):
        k = storage.recommend_keep_latest_k(pvc, size)
        assert k >= 2 and (k + 1) * size <= pvc * (1 - storage.PVC_FREE_FRACTION)


def test_pvc_too_small_for_three_checkpoints_is_a_user_error():
    with pytest.raises(UserError, match="at least"):
        storage.recommend_keep_latest_k(10 * 1024**4, storage.checkpoint_bytes("405B"))


def test_check_keep_latest_k():
    eight = storage.checkpoint_bytes("8B")
    storage.check_keep_latest_k(9, 1024**4, eight)
    with pytest.raises(UserError, match="keep_latest_k = 9"):
        storage.check_keep_latest_k(10, 1024**4, eight)
    with pytest.raises(UserError, match="keeps every checkpoint"):
        storage.check_keep_latest_k(0, 1024**4, eight)


def test_grace_period_grows_with_checkpoint_per_node_and_is_bounded():
    eight, seventy, big = (storage.checkpoint_bytes(f) for f in ("8B", "70B", "405B"))
    assert storage.recommended_grace_seconds(eight, 2) == 180
    assert 180 < storage.recommended_grace_seconds(seventy, 8) < storage.recommended_grace_seconds(seventy, 2)
    assert storage.recommended_grace_seconds(big, 1) == 3600


def test_output_dir_is_applied_by_parsing_again_with_the_dump_folder():
    config = SimpleNamespace(
        job=SimpleNamespace(dump_folder="./outputs"),
        checkpoint=SimpleNamespace(folder="ckpt"),
        metrics=SimpleNamespace(save_tb_folder="tb"),
    )
    parsed = []

    def parse(args):
        parsed.append(args)
        return "reparsed"

    assert storage.apply_output_dir(config, ["--a"], {}, parse)[:2] == (config, ["--a"]) and not parsed
    moved, args, paths = storage.apply_output_dir(config, ["--a"], {"OUTPUT_DIR": "/pvc/"}, parse)
    assert (moved, args, parsed) == ("reparsed", ["--a", "--job.dump_folder=/pvc"], [args])
    assert paths.checkpoint_folder == "/pvc/ckpt"


def test_one_join_of_the_checkpoint_folder():
    config = SimpleNamespace(job=SimpleNamespace(dump_folder="./outputs"), checkpoint=SimpleNamespace(folder="ckpt"))
    assert storage.checkpoint_folder_path("./outputs", "ckpt") == "./outputs/ckpt"  # as torchtitan joins it
    assert storage.checkpoint_dir(config) == Path("./outputs/ckpt")
    assert storage.checkpoint_folder_path("./outputs", "/abs/ckpt") == "/abs/ckpt"
    assert storage.resolve_storage({}, "./outputs", "ckpt").checkpoint_folder == "./outputs/ckpt"
