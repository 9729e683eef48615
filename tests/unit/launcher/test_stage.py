"""The stage command: tokenizer + dataset onto a PVC-like folder, against a fake Hub."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ helpers

from fakehub import FakeHub  # noqa: E402
from tokgen import write_tokenizer  # noqa: E402

from torchtitan_runai.config import Data, Hub  # noqa: E402
from torchtitan_runai.errors import UserError  # noqa: E402
from torchtitan_runai.launcher import stage
from torchtitan_runai.training import tokenizer as tokenizer_mod  # noqa: E402
from torchtitan_runai.training.data import load_local_dataset  # noqa: E402

REPO = "meta-llama/Llama-3.1-8B"
TOKEN = "hf_STAGEcanary9876543210zyxwvuTOKEN"
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def hub(monkeypatch, tok_dir):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(token=TOKEN) as fake:
        fake.add_folder(REPO, tok_dir)
        for i in range(3):
            rows = "".join(json.dumps({"text": f"c4 shard {i} doc {j}", "url": "u"}) + "\n" for j in range(5))
            fake.add_file(
                "allenai/c4", f"en/c4-train.{i:05d}-of-01024.json.gz", gzip.compress(rows.encode()), repo_type="dataset"
            )
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


def job(tmp_path, dataset="local", dataset_path=None, assets_path=None, **hub_fields):
    hub_fields.setdefault("backoff_s", 0.01)
    return SimpleNamespace(
        model=SimpleNamespace(hf_assets_path=assets_path or str(tmp_path / "no-tokenizer")),
        job=SimpleNamespace(dump_folder=str(tmp_path / "out")),
        training=SimpleNamespace(dataset=dataset, dataset_path=dataset_path),
        hub=Hub(**hub_fields),
        data=Data(stage_c4_shards=2, cache_dir=str(tmp_path / "ds_cache")),
    )


def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus" / "part-0.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    return path.parent


def test_stage_into_the_jobs_own_cache(hub, tmp_path, monkeypatch):
    lines = stage.stage(job(tmp_path, dataset_path=str(corpus(tmp_path)), repo_id=REPO))
    assert any(str(tmp_path / "out" / "hf_cache") in line for line in lines)
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tokenizer_mod.ensure_tokenizer(job(tmp_path, repo_id=REPO))
    assert (folder / "tokenizer.json").is_file() and hub.requests == []


def test_stage_to_output_dir_then_job_runs_offline(hub, tmp_path, monkeypatch):
    out = tmp_path / "pvc"
    lines = stage.stage(job(tmp_path, dataset_path=str(corpus(tmp_path)), repo_id=REPO), str(out))
    overrides = lines[-2]
    assert f"--hub.cache_dir={out / 'hf_cache'}" in overrides
    assert f"--training.dataset_path={out / 'data' / 'corpus'}" in overrides
    assert (out / "data" / "corpus" / "part-0.jsonl").is_file()
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    staged = job(tmp_path, repo_id=REPO, cache_dir=str(out / "hf_cache"))
    assert type(tokenizer_mod.build_tokenizer(staged)).__name__ == "HuggingFaceTokenizer"
    assert hub.requests == []
    # staging twice is a no-op on the network
    monkeypatch.delenv("HF_HUB_OFFLINE")
    stage.stage(job(tmp_path, dataset_path=str(corpus(tmp_path / "again")), repo_id=REPO), str(out))
    assert hub.requests == []


def test_stage_copies_a_local_tokenizer(tmp_path, tok_dir):
    cfg = job(tmp_path, dataset_path=str(corpus(tmp_path)), assets_path=str(tok_dir))
    lines = stage.stage(cfg, str(tmp_path / "pvc"))
    target = tmp_path / "pvc" / "tokenizer"
    assert f"--model.hf_assets_path={target}" in lines[-2]
    assert (target / "tokenizer.json").is_file() and (target / "original" / "tokenizer.model").is_file()


def test_stage_c4_shards_for_local_training(hub, tmp_path):
    lines = stage.stage(job(tmp_path, dataset="c4", repo_id=REPO), str(tmp_path / "pvc"))
    en = tmp_path / "pvc" / "data" / "c4" / "en"
    assert f"--training.dataset=local --training.dataset_path={en}" in lines[-2]
    assert sorted(p.name for p in en.iterdir() if p.is_file()) == [
        "c4-train.00000-of-01024.json.gz",
        "c4-train.00001-of-01024.json.gz",
    ]
    rows = load_local_dataset(str(en), Data(cache_dir=str(tmp_path / "dsc")))
    assert len(rows) == 10 and rows[0]["text"] == "c4 shard 0 doc 0"


def test_stage_reports_missing_dataset(hub, tmp_path):
    with pytest.raises(UserError, match="training.dataset_path"):
        stage.stage(job(tmp_path, dataset_path=str(tmp_path / "nothing"), repo_id=REPO))


def _wired() -> bool:
    from torchtitan_runai import config

    names = {f.name for f in dataclasses.fields(config.JobConfig)}
    return {"hub", "data"} <= names


needs_wiring = pytest.mark.skipif(not _wired(), reason="[hub]/[data] not yet in config.JobConfig")


def run_cli(tmp_path, *extra, token=TOKEN):
    args = [
        sys.executable,
        "-m",
        "torchtitan_runai.stage",
        "--config",
        str(ROOT / "train_configs" / "debug_model.toml"),
        *extra,
        f"--job.dump_folder={tmp_path / 'out'}",
        f"--model.hf_assets_path={tmp_path / 'none'}",
        "--training.dataset=local",
        f"--training.dataset_path={corpus(tmp_path)}",
        f"--hub.repo_id={REPO}",
        "--hub.backoff_s=0.01",
        "--hub.retries=1",
    ]
    env = {**os.environ, "HF_TOKEN": token, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


@needs_wiring
def test_cli_stages_and_never_prints_the_token(hub, tmp_path):
    proc = run_cli(tmp_path, "--output-dir", str(tmp_path / "pvc"))
    assert proc.returncode == 0, proc.stderr
    assert "run the job with:" in proc.stdout
    assert TOKEN not in proc.stdout + proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]


@needs_wiring
def test_cli_user_error_is_one_line_exit_2(hub, tmp_path):
    proc = run_cli(tmp_path, token=TOKEN + "-wrong")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "401" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr


# ---- without a network, and without --output-dir (issue 24) -------------------------------------


def test_cli_without_a_network_fails_at_the_first_connection(tmp_path):
    # a backoff long enough that a single retry would show (the old way: 5 retries, 72 s by default)
    env = {"HF_ENDPOINT": "http://no-such-host.invalid"}
    proc = run_cli_env(tmp_path, env, "--output-dir", str(tmp_path / "pvc"), "--hub.backoff_s=5", "--hub.retries=3")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "cannot reach the Hub: no connection could be made" in lines[0] and "retry" not in proc.stderr


def test_cli_from_the_root_refuses_a_new_folder_there(tmp_path):
    name = f"runai-stage-test-{os.getpid()}"
    args = [sys.executable, "-m", "torchtitan_runai.stage", "--config", str(ROOT / "train_configs/debug_model.toml")]
    args += [f"--job.dump_folder=./{name}", f"--model.hf_assets_path={tmp_path / 'none'}", f"--hub.repo_id={REPO}"]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE", "OUTPUT_DIR")}
    env["PYTHONPATH"] = str(ROOT)
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd="/")
        made = Path("/", name).exists()
    finally:
        if Path("/", name).exists():
            import shutil

            shutil.rmtree(Path("/", name))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"/{name}/hf_cache" in lines[0] and "file system's root" in lines[0] and "--output-dir" in lines[0]
    assert not made


def test_without_output_dir_output_dir_env_places_the_cache_as_the_job_does(tmp_path, monkeypatch):
    from torchtitan_runai.job import parse_job_config

    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "pvc"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    train_args = ["--job.config_file", str(ROOT / "train_configs/debug_model.toml"), "--model.hf_assets_path=/none"]
    config = stage.job_locations(parse_job_config(train_args), train_args)
    assert config.job.dump_folder == str(tmp_path / "pvc")
    from torchtitan_runai import storage

    assert os.environ["HF_HOME"] == str(tmp_path / "pvc" / storage.HF_CACHE_SUBDIR)


def run_cli_env(tmp_path, env, *extra):
    args = [sys.executable, "-m", "torchtitan_runai.stage", "--config", str(ROOT / "train_configs/debug_model.toml")]
    args += [*extra, f"--job.dump_folder={tmp_path / 'out'}", f"--model.hf_assets_path={tmp_path / 'none'}"]
    args += ["--training.dataset=local", f"--training.dataset_path={corpus(tmp_path)}", f"--hub.repo_id={REPO}"]
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(args, env=full, capture_output=True, text=True, timeout=300, cwd=ROOT)
