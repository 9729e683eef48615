"""Preflight: the memory estimate (numbers and messages), environment checks on real mounts, the CLI,
and the shared-folder check across ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from torchtitan_runai.checkpoint import ownership
from torchtitan_runai.checkpoint.ownership import confirm_shared_folder
from torchtitan_runai.errors import UserError
from torchtitan_runai.launcher import preflight
from torchtitan_runai.launcher.memory_estimate import GIB, ModelShape, TrainSettings, estimate_memory, ffn_hidden_dim
from torchtitan_runai.launcher.preflight import check_checkpoint_folder, check_dev_shm, check_fit, check_tokenizer

REPO = Path(__file__).resolve().parents[3]
LLAMA_8B = ModelShape(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256)
LLAMA_405B = ModelShape(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_hidden=53248, vocab_size=128256)
PROXY = ModelShape(dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256)


# ---------------------------------------------------------------------------------------------
# estimator


def test_shapes_and_parameter_counts_match_llama_3_1():
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672
    assert ffn_hidden_dim(16384, 4096, 1.2) == 53248
    assert LLAMA_8B.params == 8_030_261_248  # storage.PARAMS_BY_FLAVOR["8B"]
    assert LLAMA_405B.params == 405_853_388_800
    assert abs(PROXY.params / 1e9 - 2.80) < 0.01


def test_model_states_of_the_proxy_on_one_gpu():
    est = estimate_memory(PROXY, TrainSettings(ac_mode="none"))
    b = est.breakdown
    assert b["parameters"] == pytest.approx(PROXY.params * 4 / GIB)
    assert b["optimizer"] == pytest.approx(2 * b["parameters"])
    assert est.moment == "backward start" and b["gradients"] == 0  # set to None until the backward pass
    # autocast's bf16 copies of the block weights and the output layer
    assert b["weights in flight"] == pytest.approx(2 * (PROXY.params - PROXY.embedding_params - PROXY.dim) / GIB)
    assert b["logits"] == pytest.approx(8192 * 128256 * 3.2 / GIB)


@pytest.mark.parametrize(
    "lbs, ac, compile_, float8, measured",
    [
        (1, "op", True, False, 43.95),  # performance-anchors.md, H100, 2026-11-25
        (1, "none", True, False, 50.5),
        (4, "op", True, False, 67.4),
        (4, "full", True, False, 57.4),
        (2, "none", True, True, 58.1),
        (4, "op", True, True, 68.7),
        (1, "op", False, False, 55.5),
    ],
)
def test_estimate_is_within_ten_percent_of_measured_proxy_peaks(lbs, ac, compile_, float8, measured):
    from bench.memory_estimate import settings

    est = estimate_memory(PROXY, settings(lbs, ac, compile_, float8))
    assert abs(est.allocator_peak_gib - measured) / measured <= 0.10


def test_the_whole_committed_comparison_set_is_within_ten_percent():
    from bench.memory_estimate import compare

    rows = compare()
    assert len(rows) >= 12
    assert all(abs(r["error"]) <= 10 for r in rows), [r for r in rows if abs(r["error"]) > 10]


def test_activation_checkpointing_modes_order():
    acts = {}
    for name, mode, option in [
        ("none", "none", "op"),
        ("layer2", "selective", "2"),
        ("op", "selective", "op"),
        ("full", "full", "op"),
    ]:
        est = estimate_memory(LLAMA_8B, TrainSettings(ac_mode=mode, ac_option=option, dp_shard=8))
        acts[name] = est.breakdown["activations"]
    assert acts["none"] > acts["layer2"] > acts["op"] > acts["full"] > 0
    # full: the 32 block inputs plus one block recomputed
    s = 8192 * 2
    assert acts["full"] == pytest.approx((32 * s * 4096 + acts["none"] / 32 * GIB) / GIB)


def test_sharding_fsdp_tp_and_loss_parallel():
    one = estimate_memory(LLAMA_8B, TrainSettings(dp_shard=8))
    tp = estimate_memory(LLAMA_8B, TrainSettings(dp_shard=4, tp=2))
    assert one.breakdown["parameters"] == pytest.approx(LLAMA_8B.params * 4 / 8 / GIB)
    assert tp.breakdown["parameters"] == pytest.approx(one.breakdown["parameters"])
    assert tp.breakdown["activations"] == pytest.approx(one.breakdown["activations"] / 2)
    assert tp.breakdown["logits"] == pytest.approx(one.breakdown["logits"] / 2)
    no_lp = estimate_memory(LLAMA_8B, TrainSettings(dp_shard=4, tp=2, loss_parallel=False))
    assert no_lp.breakdown["logits"] == pytest.approx(one.breakdown["logits"])
    # FSDP: only ~2 blocks' bf16 weights gathered, not autocast copies of all 32
    autocast = estimate_memory(LLAMA_8B, TrainSettings()).breakdown["weights in flight"]
    assert one.breakdown["weights in flight"] < 0.2 * autocast


def test_compile_off_costs_more_and_batch_scales():
    on = estimate_memory(PROXY, TrainSettings(local_batch_size=2))
    off = estimate_memory(PROXY, TrainSettings(local_batch_size=2, compile=False))
    assert off.breakdown["logits"] > 3 * on.breakdown["logits"]
    assert off.breakdown["activations"] > on.breakdown["activations"]
    lbs4 = estimate_memory(PROXY, TrainSettings(local_batch_size=4))
    assert lbs4.breakdown["activations"] == pytest.approx(2 * on.breakdown["activations"])


def test_optimizer_step_can_be_the_peak():
    est = estimate_memory(LLAMA_405B, TrainSettings(dp_shard=8, ac_mode="full"))
    assert est.moment == "optimizer step"
    assert est.breakdown["gradients"] > 0 and est.breakdown["activations"] == 0


# ---------------------------------------------------------------------------------------------
# fit messages


def test_fit_ok_warning_and_error_messages():
    s = TrainSettings(dp_shard=16)
    est = estimate_memory(LLAMA_8B, s)
    assert check_fit(est, 79.6, s).level == "ok"
    assert check_fit(est, est.total_gib, s).level == "warning"

    big = TrainSettings(dp_shard=16, local_batch_size=8, ac_mode="none")
    f = check_fit(estimate_memory(LLAMA_8B, big), 79.6, big)
    assert f.level == "error"
    assert "biggest consumer: activations" in f.message and 'activation_checkpoint.mode = "full"' in f.message
    assert "local_batch_size" in f.message and "tensor_parallel_degree" in f.message

    huge = TrainSettings(dp_shard=16, ac_mode="full")
    f = check_fit(estimate_memory(LLAMA_405B, huge), 79.6, huge)
    assert f.level == "error" and "biggest consumer: optimizer" in f.message
    assert "data_parallel_shard_degree" in f.message


def test_fit_names_logits_when_they_dominate():
    s = TrainSettings(local_batch_size=16, ac_mode="full", dp_shard=64)
    small_vocab_huge_logits = ModelShape(
        dim=1024, n_layers=2, n_heads=8, n_kv_heads=8, ffn_hidden=4096, vocab_size=256000
    )
    f = check_fit(estimate_memory(small_vocab_huge_logits, s), 20, s)
    assert "biggest consumer: logits" in f.message and "loss parallel" in f.message


# ---------------------------------------------------------------------------------------------
# environment checks on real mounts (a private mount namespace: CI runs as root, chmod is no test)

UNSHARE = shutil.which("unshare")


def _in_mount_namespace(setup: str, snippet: str) -> dict:
    """Run shell ``setup``, then a python ``snippet`` that prints JSON, in `unshare -rm` (-m as root)."""
    if UNSHARE is None:
        pytest.skip("unshare not available")
    flags = "-m" if os.geteuid() == 0 else "-rm"
    argv = [UNSHARE, flags, "sh", "-c", setup + ' && exec "$0" -c "$1"', sys.executable, snippet]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip("mount namespaces are not allowed here")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe(mount_opts: str, call: str, tmp_path: Path) -> dict:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    py = (
        f"import json, dataclasses; from torchtitan_runai.launcher.preflight import *; "
        f"print(json.dumps(dataclasses.asdict({call})))"
    )
    return _in_mount_namespace(f"mount -t tmpfs -o {mount_opts} tmpfs {mnt}", py.replace("MNT", str(mnt)))


def test_checkpoint_folder_on_a_read_only_mount_is_an_error(tmp_path):
    f = _probe("size=16m,ro", "check_checkpoint_folder('MNT/ckpt', 1000)", tmp_path)
    assert f["level"] == "error" and "not writable" in f["message"] and "Read-only" in f["message"]


def test_checkpoint_folder_without_room_for_a_checkpoint_is_an_error(tmp_path):
    f = _probe("size=4m", "check_checkpoint_folder('MNT/ckpt', 100 * 1024**2)", tmp_path)
    assert f["level"] == "error" and "needs 0.10 GiB" in f["message"]
    assert "1 checkpoint of 0.10 GiB (checkpoint.keep_latest_k = 0 keeps every checkpoint" in f["message"]


def test_checkpoint_folder_needs_room_for_its_peak_keep_latest_k_plus_the_one_being_written(tmp_path):
    # 3 MiB checkpoints, keep_latest_k = 2: a fresh folder peaks at 3 of them (9 MiB) on an 8 MiB volume;
    # room for one checkpoint, the old rule, would have passed
    f = _probe("size=8m", "check_checkpoint_folder('MNT/ckpt', 3 * 1024**2, 2)", tmp_path)
    assert f["level"] == "error", f
    assert f"needs 0.01 GiB ({9 * 1024**2} bytes) more: 3 checkpoints of 0.00 GiB" in f["message"]
    assert "checkpoint.keep_latest_k = 2 kept + 1 being written" in f["message"]
    assert "lower checkpoint.keep_latest_k" in f["message"].split("Fix:")[1]
    assert check_checkpoint_folder(tmp_path / "fresh", 3 * 1024**2, 2).level == "ok"  # the real disk


def test_checkpoint_peak_counts_kept_checkpoints_on_disk_and_what_retention_frees(tmp_path):
    sys.path.insert(0, str(REPO / "tests/unit/checkpoint"))
    from ckpt_util import write_ckpt

    for step in (5, 10, 15, 20):
        write_ckpt(tmp_path / "ckpt", step)
    f = check_checkpoint_folder(tmp_path / "ckpt", 1000, 2)
    assert f.level == "ok"
    # 2 of the 3 at the peak are on disk (steps 15 and 20); steps 5 and 10 are removed first
    assert "3 checkpoints of" in f.message and "2 of them already on disk" in f.message
    assert "that retention removes first" in f.message


def test_checkpoint_folder_writable_with_room_is_ok_and_left_clean(tmp_path):
    f = check_checkpoint_folder(tmp_path / "a" / "b", 1000)
    assert f.level == "ok"
    assert list(tmp_path.iterdir()) == []  # the probe file is removed, no folder created


def test_dev_shm_default_size_warns(tmp_path):
    f = _probe("size=64m", "check_dev_shm('MNT')", tmp_path)
    assert f["level"] == "warning" and "64 MiB" in f["message"] and "--large-shm" in f["message"]


def test_dev_shm_large_is_ok_and_missing_warns(tmp_path):
    assert _probe("size=2g", "check_dev_shm('MNT')", tmp_path)["level"] == "ok"
    assert check_dev_shm(str(tmp_path / "nope")).level == "warning"


# ---------------------------------------------------------------------------------------------
# tokenizer (never downloads)


def _config(tmp_path, assets_path="", repo_id="", allow_download=True):
    from torchtitan_runai.config import Hub

    return SimpleNamespace(
        model=SimpleNamespace(hf_assets_path=assets_path),
        hub=Hub(repo_id=repo_id, cache_dir=str(tmp_path / "cache"), allow_download=allow_download),
        job=SimpleNamespace(dump_folder=str(tmp_path)),
    )


def test_tokenizer_present_locally(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    assert check_tokenizer(_config(tmp_path, str(tmp_path / "tok")), env={}).level == "ok"


def test_tokenizer_missing_without_repo_is_an_error(tmp_path):
    f = check_tokenizer(_config(tmp_path, str(tmp_path / "none")), env={})
    assert f.level == "error" and "model.hf_assets_path" in f.message


def test_tokenizer_offline_with_empty_cache_is_an_error(tmp_path):
    f = check_tokenizer(_config(tmp_path, repo_id="meta-llama/Llama-3.1-8B"), env={"HF_HUB_OFFLINE": "1"})
    assert f.level == "error" and "HF_HUB_OFFLINE" in f.message and "stage" in f.message


def test_tokenizer_download_needs_a_token_for_gated_repos(tmp_path):
    cfg = _config(tmp_path, repo_id="meta-llama/Llama-3.1-8B")
    f = check_tokenizer(cfg, env={})
    assert f.level == "warning" and "HF_TOKEN" in f.message
    secret = "hf_" + "x" * 30
    f = check_tokenizer(cfg, env={"HF_TOKEN": secret})
    assert f.level == "ok" and secret not in f.message
    assert not (tmp_path / "cache").exists()  # nothing downloaded, nothing created


def test_tokenizer_check_finds_the_token_where_the_download_does(tmp_path):
    # issue 23: the Run:ai v2 spec mounts the Secret and sets HF_TOKEN_PATH; preflight read only
    # HF_TOKEN and reported a download "without HF_TOKEN"
    cfg = _config(tmp_path, repo_id="meta-llama/Llama-3.1-8B")
    secret = "hf_" + "y" * 30
    token_file = tmp_path / "secret" / "HF_TOKEN"
    token_file.parent.mkdir()
    token_file.write_text(secret + "\n")
    f = check_tokenizer(cfg, env={"HF_TOKEN_PATH": str(token_file)})
    assert f.level == "ok" and f"token from HF_TOKEN_PATH ({token_file})" in f.message, f.message
    assert secret not in f.message
    f = check_tokenizer(cfg, env={"HF_TOKEN": secret, "HF_TOKEN_PATH": str(token_file)})
    assert f.level == "ok" and "token from HF_TOKEN)" in f.message and secret not in f.message
    token_file.write_text("\n")  # the Secret is empty: an error, as the download would be refused
    f = check_tokenizer(cfg, env={"HF_TOKEN_PATH": str(token_file)})
    assert f.level == "error" and "HF_TOKEN_PATH" in f.message and "empty" in f.message
    f = check_tokenizer(cfg, env={})
    assert f.level == "warning" and "neither HF_TOKEN nor HF_TOKEN_PATH" in f.message


# ---------------------------------------------------------------------------------------------
# run_preflight and the CLI


def test_run_preflight_dry_run_turns_machine_errors_into_notes(tmp_path):
    from torchtitan_runai.job import parse_job_config

    config = parse_job_config(
        ["--job.config_file", "train_configs/debug_model.toml", "--model.hf_assets_path", str(tmp_path / "missing")]
    )
    real = preflight.run_preflight(config, 2, 79.6, dry_run=False, env={})
    dry = preflight.run_preflight(config, 2, 79.6, dry_run=True, env={})
    level = lambda fs, check: next(f.level for f in fs if f.check == check)  # noqa: E731
    assert level(real, "tokenizer") == "error" and level(dry, "tokenizer") == "note"
    assert level(real, "memory") == "ok" and level(real, "parallelism") == "ok"
    tiny = preflight.run_preflight(config, 2, 0.5, dry_run=False, env={})
    assert level(tiny, "memory") == "error"
    assert level(preflight.run_preflight(config, 2, 0.5, dry_run=True, env={}), "memory") == "warning"
    tp2 = parse_job_config(
        ["--job.config_file", "train_configs/debug_model.toml", "--parallelism.tensor_parallel_degree", "2"]
    )
    bad = preflight.run_preflight(tp2, 3, 79.6, env={})
    assert level(bad, "parallelism") == "error" and "world size 3" in bad[0].message
    assert [f.check for f in bad] == ["parallelism"]


def test_enforce_prints_warnings_and_raises_the_first_error():
    from torchtitan_runai.launcher.preflight import Finding, enforce

    lines: list[str] = []
    enforce([Finding("ok", "a", "fine"), Finding("warning", "/dev/shm", "small")], warn=lines.append)
    assert lines == ["[preflight] warning: /dev/shm: small"]
    with pytest.raises(UserError) as info:
        enforce([Finding("error", "memory", "does not fit: 90 GiB. Fix: lower local_batch_size")], warn=lines.append)
    assert info.value.line() == "preflight memory: does not fit: 90 GiB. Fix: lower local_batch_size"


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "torchtitan_runai.preflight", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_cli_reports_a_fitting_debug_run(tmp_path):
    proc = _cli(
        "--config",
        "train_configs/debug_model.toml",
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
        "--job.dump_folder",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "[     ok] memory: fits" in proc.stdout and "activations" in proc.stdout
    # Its 10 s budget is a benchmark (bench/preflight_time.py, results in bench/results/), not a test.


def test_cli_exits_2_when_the_model_does_not_fit(tmp_path):
    args = [
        "--config",
        "train_configs/llama3_405b.toml",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--gpu-memory-gib",
        "80",
        "--job.dump_folder",
        str(tmp_path),
    ]
    proc = _cli(*args)
    assert proc.returncode == 2
    assert "[  error] memory: does not fit" in proc.stdout and "biggest consumer: optimizer" in proc.stdout
    proc = _cli(*args, "--dry-run")  # the GPU may differ from the machine of a dry run
    assert proc.returncode == 0 and "[warning] memory: does not fit" in proc.stdout


def test_cli_bad_config_is_one_line_exit_2():
    proc = _cli("--config", "train_configs/debug_model.toml", "--training.local_batchsize", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "local_batch_size" in proc.stderr


# ---------------------------------------------------------------------------------------------
# shared checkpoint folder


def _run_ranks(folders: list[Path], world: int, key="job-1", timeout=0.5):
    """Ranks as threads with a real barrier; broadcast carries rank 0's value."""
    barrier = threading.Barrier(world)
    box: dict = {}
    errors: dict[int, BaseException] = {}

    def broadcast(value):
        if value is not None:
            box["v"] = value
        barrier.wait(timeout=10)
        return box["v"]

    def rank(r):
        try:
            confirm_shared_folder(folders[r], r, world, key, timeout=timeout, broadcast=broadcast, poll=0.05)
        except BaseException as e:  # noqa: BLE001
            errors[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join(20) for t in threads]
    return errors


def test_shared_folder_seen_by_every_rank(tmp_path):
    assert _run_ranks([tmp_path / "ckpt"] * 4, 4) == {}
    assert (tmp_path / "ckpt" / ownership.MARKER_NAME).read_text().startswith("job-1 ")


def test_node_local_folder_is_a_clear_error(tmp_path):
    folders = [tmp_path / "node0" / "ckpt"] * 2 + [tmp_path / "node1" / "ckpt"] * 2
    errors = _run_ranks(folders, 4)
    assert sorted(errors) == [2, 3]
    e = errors[2]
    assert isinstance(e, UserError)
    assert "OUTPUT_DIR" in e.line() and "ReadWriteMany" in e.line() and "rank 2" in e.line()


def test_stale_marker_from_another_folder_copy_is_an_error(tmp_path):
    node1 = tmp_path / "node1"
    node1.mkdir()
    (node1 / ownership.MARKER_NAME).write_text("job-1 0123")  # an old run's marker on the local disk
    errors = _run_ranks([tmp_path / "node0", node1], 2)
    assert "another job's or an older marker" in errors[1].line()


def test_single_process_needs_nothing(tmp_path):
    confirm_shared_folder(tmp_path / "x", 0, 1, "job", broadcast=lambda v: pytest.fail("no broadcast"))
    assert not (tmp_path / "x").exists()


def test_shared_folder_over_a_real_gloo_process_group(tmp_path):
    from tests.conftest import free_port

    script = textwrap.dedent("""
        import os, sys, torch.distributed as dist
        from torchtitan_runai.checkpoint.ownership import confirm_shared_folder
        from torchtitan_runai.errors import UserError
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", rank=rank, world_size=2, init_method="tcp://127.0.0.1:" + sys.argv[2])
        try:
            confirm_shared_folder(sys.argv[3 + rank], rank, 2, "job", timeout=1)
            print("OK")
        except UserError as e:
            print("ERR", e.line())
        dist.destroy_process_group()
    """)
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(r), port, a, b], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        for r in range(2)
    ]
    out = [p.communicate(timeout=120)[0] for p in procs]
    assert out[0].strip() == "OK"
    assert out[1].startswith("ERR") and "ReadWriteMany" in out[1]


def test_gpu_memory_comes_from_nvidia_smi_without_touching_cuda(tmp_path, monkeypatch):
    # No GPU here: a stand-in nvidia-smi prints what the real one prints on an 80 GB H100 node.
    from torchtitan_runai.launcher.preflight import detect_gpu_memory_gib

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '81559\\n81559\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert abs(detect_gpu_memory_gib() - 79.65) < 0.01
    monkeypatch.setenv("PATH", "/nonexistent")
    assert detect_gpu_memory_gib() is None


# host memory for pinned checkpoint staging


def test_host_memory_limit_is_the_smaller_of_cgroup_and_ram(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       2097152 kB\nMemFree: 1 kB\n")  # 2 GiB
    v2 = tmp_path / "memory.max"
    v2.write_text("max\n")
    assert preflight.host_memory_limit((str(v2),), str(meminfo)) == (2 * GIB, "the node's RAM")
    v2.write_text(f"{GIB}\n")
    limit, source = preflight.host_memory_limit((str(v2), str(tmp_path / "absent")), str(meminfo))
    assert limit == GIB and "memory limit" in source and str(v2) in source


def test_pinned_staging_that_cannot_fit_the_pod_is_an_error_naming_the_fix():
    from torchtitan_runai.job import parse_job_config

    config = parse_job_config(["--job.config_file", "train_configs/llama3_8b.toml"], world_size=16)
    params = 8_030_261_248
    # 16 GPUs over 2 nodes: each node's 8 ranks hold half of a ~96 GB checkpoint
    small = preflight.check_host_memory(config, params, 16, 8, limit=(40 * 10**9, "the container's memory limit"))
    assert small.level == "error" and "48.2 GB per node" in small.message
    assert "memory limit" in small.message and 'async_mode = "async"' in small.message
    big = preflight.check_host_memory(config, params, 16, 8, limit=(2 * 10**12, "the node's RAM"))
    assert big.level == "ok"
    config.checkpoint.async_mode = "async"
    assert preflight.check_host_memory(config, params, 16, 8, limit=(1, "x")) is None  # nothing pinned


def test_run_preflight_reports_host_memory_and_a_dry_run_notes_it():
    from torchtitan_runai.job import parse_job_config

    config = parse_job_config(["--job.config_file", "train_configs/llama3_8b.toml"], world_size=16)
    tiny = (10**9, "the container's memory limit")
    level = lambda fs: next(f.level for f in fs if f.check == "host memory")  # noqa: E731
    assert level(preflight.run_preflight(config, 16, 79.6, env={}, local_ranks=8, host_limit=tiny)) == "error"
    assert (
        level(preflight.run_preflight(config, 16, 79.6, dry_run=True, env={}, local_ranks=8, host_limit=tiny)) == "note"
    )


# --- issue 16: a cluster job is not judged by the laptop that checks it ------------------------


def test_machine_checks_of_another_machine_are_notes_not_errors(tmp_path):
    from torchtitan_runai.job import parse_job_config

    config = parse_job_config(
        ["--job.config_file", "train_configs/llama3_8b.toml", "--job.dump_folder", str(tmp_path)], world_size=16
    )
    tiny = (10**9, "the node's RAM")
    here = preflight.run_preflight(config, 16, 79.6, env={}, local_ranks=8, host_limit=tiny, here=True)
    there = preflight.run_preflight(config, 16, 79.6, env={}, local_ranks=8, host_limit=tiny, here=False)
    by = lambda fs: {f.check: f for f in fs}  # noqa: E731
    assert by(here)["host memory"].level == "error"
    for check in ("host memory", "checkpoint", "tokenizer", "/dev/shm"):
        note = by(there)[check]
        assert note.level == "note" and note.message.startswith(preflight.NOT_HERE), note
        assert "Fix:" not in note.message
    assert by(there)["memory"].level == "ok"  # the fit is about the job's GPU, judged anyway
    assert not any(f.level == "error" for f in there)


def test_readme_preflight_example_passes_on_a_machine_without_the_gpus():
    # the README's command, as written: main exited 2 on a laptop (its disk and RAM as errors)
    if preflight.visible_gpus() >= 8:
        pytest.skip("this machine has the job's 8 GPUs: it is judged as one of its nodes")
    proc = _cli("--config", "train_configs/llama3_8b.toml", "--nodes", "2", "--gpus-per-node", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not one of the job's nodes" in proc.stdout and "[  error]" not in proc.stdout
    assert "[   note] host memory: this machine" in proc.stdout


# --- the grace budget: will a preemption checkpoint fit? -----------------------------------------


def test_grace_period_comes_from_the_spec_else_kubernetes_default():
    from torchtitan_runai import storage

    assert storage.grace_period({}) == (30, "Kubernetes' default")
    assert storage.grace_period({storage.GRACE_PERIOD_ENV: "180"}) == (180, storage.GRACE_PERIOD_ENV)
    assert storage.default_shutdown_timeout({storage.GRACE_PERIOD_ENV: "180"}) == 175
    with pytest.raises(UserError, match="TERMINATION_GRACE_PERIOD_SECONDS"):
        storage.grace_period({storage.GRACE_PERIOD_ENV: "3m"})


def test_shutdown_timeout_defaults_to_the_grace_period_less_a_margin():
    from torchtitan_runai.launcher.launch import plan_launch

    assert plan_launch({}, 0).shutdown_timeout == 25
    assert plan_launch({"TERMINATION_GRACE_PERIOD_SECONDS": "300"}, 0).shutdown_timeout == 295
    assert plan_launch({"TERMINATION_GRACE_PERIOD_SECONDS": "300", "SHUTDOWN_TIMEOUT": "60"}, 0).shutdown_timeout == 60


def test_kill_window_is_this_torchruns():
    from torch.distributed.run import get_args_parser

    has_flag = "--shutdown_timeout" in get_args_parser()._option_string_actions
    seconds, why = preflight.torchrun_kill_window(55)
    assert (seconds, "SHUTDOWN_TIMEOUT" in why) == ((55, True) if has_flag else (30, False))


def test_probe_measures_a_write_speed_and_leaves_nothing(tmp_path):
    speed = preflight.probe_write_speed(tmp_path / "not-yet" / "checkpoint", threads=2, bytes_per_thread=1 << 20)
    assert speed > 0 and not list(tmp_path.iterdir())  # nothing created, probes removed


def test_a_preemption_that_cannot_fit_is_one_warning_with_the_fixes():
    fits = preflight.GraceBudget(300, "TERMINATION_GRACE_PERIOD_SECONDS", 295, "SHUTDOWN_TIMEOUT=295", 24e9, 2e9)
    assert preflight.check_grace_budget(fits, "/outputs/checkpoint").level == "ok"  # 2 x 12 s + 5 s
    tight = preflight.GraceBudget(
        30, "Kubernetes' default", 30, "this torchrun's fixed 30 s (it has no --shutdown_timeout)", 48e9, 2e9
    )
    assert tight.needed_s == 53 and tight.budget_s == 27
    finding = preflight.check_grace_budget(tight, "/outputs/checkpoint")
    assert finding.level == "warning" and finding.check == "grace period"
    for fix in (
        "terminationGracePeriodSeconds to 66",
        "older torchrun always kills after 30 s",
        "checkpoint_perf.writer_threads",
        "more nodes",
        "2 x 48.0 GB per node at 2.00 GB/s",
    ):
        assert fix in finding.message, fix
