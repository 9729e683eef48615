"""The workers' environment (torchtitan_runai.launcher.workers): every variable, who wins, applied once."""

import os
from pathlib import Path

from conftest import REPO, pod_env

from torchtitan_runai.errors import HANG_VERDICT_ENV, WORKER_ERROR_ENV
from torchtitan_runai.goodput.ledger import LAUNCH_ID_ENV
from torchtitan_runai.launcher import workers


def test_every_variable_the_workers_get():
    env = workers.environment(
        {}, "/out", 8, shutdown_timeout=40, hang_verdict=Path("/tmp/x/hang-verdict"), launch_id="launch-1"
    )
    assert env == {
        "TORCHINDUCTOR_CACHE_DIR": "/out/.cache/inductor",
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
        "PYTORCH_ALLOC_CONF": "expandable_segments:True",
        "OMP_NUM_THREADS": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "40",
        HANG_VERDICT_ENV: "/tmp/x/hang-verdict",
        LAUNCH_ID_ENV: "launch-1",
    }


def test_one_process_per_node_and_a_torchrun_with_the_flag_add_nothing_more():
    assert workers.environment({}, "/out", 1) == {
        **workers.worker_env("/out", {}),
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def test_workers_stay_offline_when_the_data_is_on_disk():
    assert workers.environment({}, "/out", 1, inputs_on_disk=True)["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in workers.environment({}, "/out", 1)  # c4 is streamed from the Hub
    mine = {"HF_HUB_OFFLINE": "0", "HF_UPDATE_DOWNLOAD_COUNTS": "1", "HF_HUB_DISABLE_TELEMETRY": "0"}
    assert not set(mine) & set(workers.environment(mine, "/out", 1, inputs_on_disk=True))  # the user wins


def test_the_user_wins_the_defaults_and_the_launcher_its_own():
    user = {
        "OMP_NUM_THREADS": "4",
        "TORCHINDUCTOR_CACHE_DIR": "/mine",
        "PYTORCH_CUDA_ALLOC_CONF": "x",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5",
        HANG_VERDICT_ENV: "/stale",
        LAUNCH_ID_ENV: "stale",
    }
    env = workers.environment(user, "/out", 8, shutdown_timeout=40, hang_verdict="/new", launch_id="new")
    assert not {"OMP_NUM_THREADS", "TORCHINDUCTOR_CACHE_DIR", "PYTORCH_ALLOC_CONF"} & set(env)
    assert (env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"], env[HANG_VERDICT_ENV], env[LAUNCH_ID_ENV]) == ("40", "/new", "new")


def test_the_launcher_exports_them_once_just_before_the_agent(monkeypatch, tmp_path):
    # a real (CPU, 2 processes) launch up to torchrun's agent: what the workers would inherit
    from torchtitan_runai.launcher import launch

    env = pod_env(OUTPUT_DIR=str(tmp_path / "out"), OMP_NUM_THREADS="3")
    for name in (
        "HF_HOME",
        "TORCHINDUCTOR_CACHE_DIR",
        "PYTORCH_ALLOC_CONF",
        "PYTORCH_CUDA_ALLOC_CONF",
        HANG_VERDICT_ENV,
        LAUNCH_ID_ENV,
        "HF_HUB_OFFLINE",
    ):
        env.pop(name, None)
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(launch.preflight, "visible_gpus", lambda: 0)
    seen = {}

    def agent(command, plan, hang_verdict, worker_error):
        seen[WORKER_ERROR_ENV + "_arg"] = str(worker_error)
        seen.update(os.environ, verdict_dir=str(hang_verdict.parent), verdict_dir_exists=hang_verdict.parent.is_dir())
        return 0

    monkeypatch.setattr(launch, "run_agent", agent)
    assert launch.main(["--training.steps", "1", "--lr_scheduler.warmup_steps", "1"]) == 0
    out = tmp_path / "out"
    assert seen["HF_HOME"] == str(out / ".cache" / "huggingface")
    assert seen["TORCHINDUCTOR_CACHE_DIR"] == str(out / ".cache" / "inductor")
    assert seen["OMP_NUM_THREADS"] == "3"  # the user's
    assert seen["HF_HUB_OFFLINE"] == "1"  # the rehearsal's data and tokenizer are files
    assert seen[HANG_VERDICT_ENV] == seen["verdict_dir"] + "/hang-verdict" and seen["verdict_dir_exists"]
    assert seen[WORKER_ERROR_ENV] == seen[WORKER_ERROR_ENV + "_arg"] == seen["verdict_dir"] + "/worker-error"
    assert (out / "checkpoint" / "goodput" / f"{seen[LAUNCH_ID_ENV]}.json").is_file()
    assert not Path(seen["verdict_dir"]).exists()  # the scratch folder goes with the agent
