"""Environment shapes -> torchrun arguments (pure), one test per shape in cluster-env.md."""

import os
import subprocess
from types import SimpleNamespace

import pytest
from conftest import DEBUG_CONFIG, pod_env, run_launcher

from torchtitan_runai.errors import UserError
from torchtitan_runai.launcher.launch import plan_launch, torchrun_args, trainer_args
from torchtitan_runai.launcher.workers import worker_env


def kubeflow_pod(index: int, nodes: int = 2, nproc: str = "8", job: str = "llama") -> dict:
    """What training-operator v1.8/1.9 puts in pod `index` of a PyTorchJob with a Master."""
    return {
        "MASTER_ADDR": f"{job}-master-0",
        "PET_MASTER_ADDR": f"{job}-master-0",
        "MASTER_PORT": "23456",
        "PET_MASTER_PORT": "23456",
        "RANK": str(index),
        "PET_NODE_RANK": str(index),
        "WORLD_SIZE": str(nodes * int(nproc)) if nproc.isdigit() else str(nodes),
        "PET_NNODES": str(nodes),
        "PET_NPROC_PER_NODE": nproc,
        "PYTHONUNBUFFERED": "1",
    }


def opt(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_kubeflow_master_and_worker_rendezvous_at_master():
    for index in (0, 1):
        plan = plan_launch(kubeflow_pod(index), gpu_count=8)
        args = torchrun_args(plan, ["--job.config_file", "c.toml"])
        assert plan.shape == "Kubeflow PyTorchJob / Run:ai"
        assert opt(args, "--nnodes") == "2"
        assert opt(args, "--nproc_per_node") == "8"
        assert opt(args, "--rdzv_backend") == "c10d"
        assert opt(args, "--rdzv_endpoint") == "llama-master-0:23456"
        assert opt(args, "--node_rank") == str(index)
        assert "--standalone" not in args
        assert args[-2:] == ["--job.config_file", "c.toml"]


def test_world_size_counting_processes_is_not_the_node_count():
    # nprocPerNode=8 makes WORLD_SIZE=16 on a 2-pod job: the node count must still be 2.
    plan = plan_launch(kubeflow_pod(0, nodes=2, nproc="8"), gpu_count=8)
    assert plan.nnodes == "2" and plan.world_size == 16


def test_nproc_auto_uses_visible_gpus_and_v17_worker_without_nproc():
    plan = plan_launch(kubeflow_pod(1, nproc="auto"), gpu_count=4)
    assert plan.nproc_per_node == 4
    env = kubeflow_pod(1)
    del env["PET_NPROC_PER_NODE"]  # v1.7 sets it on the master only
    assert plan_launch(env, gpu_count=8).nproc_per_node == 8


def test_ngpu_wins_over_operator_and_gpus():
    env = {**kubeflow_pod(0, nproc="8"), "NGPU": "2"}
    assert plan_launch(env, gpu_count=8).nproc_per_node == 2


def test_old_operator_master_localhost_and_world_size_is_pods():
    master = {"MASTER_ADDR": "localhost", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "0"}
    worker = {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2"}
    pm, pw = plan_launch(master, 8), plan_launch(worker, 8)
    assert pm.shape == pw.shape == "old Kubeflow operator"
    assert pm.nnodes == pw.nnodes == "3"
    assert pm.rdzv_endpoint == "localhost:23456" and pw.rdzv_endpoint == "job-master-0:23456"
    assert pw.node_rank == 2


def test_elastic_pytorchjob_min_max_and_operator_restarts():
    env = {
        "PET_RDZV_ENDPOINT": "job-worker-0:29400",
        "PET_RDZV_BACKEND": "c10d",
        "PET_NNODES": "2:4",
        "PET_MAX_RESTARTS": "3",
        "PET_RDZV_ID": "abc",
        "PET_RDZV_CONF": "read_timeout=60",
        "PET_NPROC_PER_NODE": "8",
    }
    plan = plan_launch(env, gpu_count=8)
    args = torchrun_args(plan, [])
    assert plan.shape == "elastic PyTorchJob"
    assert opt(args, "--nnodes") == "2:4" and plan.world_size == 32
    assert opt(args, "--rdzv_endpoint") == "job-worker-0:29400"
    assert opt(args, "--rdzv_id") == "abc"
    assert opt(args, "--max_restarts") == "3"
    assert opt(args, "--rdzv_conf") == "join_timeout=600,read_timeout=60"
    assert "--node_rank" not in args


def test_trainer_v2_pet_only():
    env = {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "auto",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "tj-node-0-0.tj",
        "PET_MASTER_PORT": "29500",
    }
    plan = plan_launch(env, gpu_count=8)
    assert plan.shape == "Kubeflow Trainer v2"
    assert plan.rdzv_endpoint == "tj-node-0-0.tj:29500" and plan.nnodes == "2" and plan.nproc_per_node == 8


def test_single_node_standalone_and_cpu_rehearsal_count():
    plan = plan_launch({}, gpu_count=8)
    assert plan.standalone and plan.nproc_per_node == 8 and "--standalone" in torchrun_args(plan, [])
    assert plan_launch({}, gpu_count=0).nproc_per_node == 2
    assert plan_launch({"CPU_NPROC": "3"}, gpu_count=0).nproc_per_node == 3


def test_one_node_job_runs_standalone():
    plan = plan_launch(kubeflow_pod(0, nodes=1), gpu_count=8)
    assert plan.standalone and plan.rdzv_endpoint == ""


def test_override_nnodes_and_knobs():
    env = {
        **kubeflow_pod(0),
        "OVERRIDE_PET_NNODES": "4",
        "MAX_RESTARTS": "0",
        "RDZV_TIMEOUT": "120",
        "LOG_RANK": "0,1",
        "RDZV_ID": "run-7",
    }
    args = torchrun_args(plan_launch(env, 8), [])
    assert opt(args, "--nnodes") == "4"
    assert opt(args, "--max_restarts") == "0"
    assert opt(args, "--rdzv_conf") == "join_timeout=120"
    assert opt(args, "--local_ranks_filter") == "0,1"
    assert opt(args, "--rdzv_id") == "run-7"


def test_defaults_max_restarts_1_and_job_uuid_as_id():
    plan = plan_launch({**kubeflow_pod(0), "JOB_UUID": "u-1"}, 8)
    assert plan.max_restarts == 1 and plan.rdzv_id == "u-1"


@pytest.mark.parametrize(
    "env, setting",
    [
        ({**kubeflow_pod(0), "PET_NNODES": "two"}, "PET_NNODES"),
        ({**kubeflow_pod(0), "PET_NNODES": "3:2"}, "PET_NNODES"),
        ({"MASTER_ADDR": "job-master-0", "WORLD_SIZE": "2"}, "MASTER_PORT"),
        ({"MASTER_ADDR": "job-master-0:23456", "MASTER_PORT": "23456", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
        ({**kubeflow_pod(0), "MASTER_PORT": "99999"}, "MASTER_PORT"),
        ({"NGPU": "eight"}, "NGPU"),
        ({"NGPU": "0"}, "NGPU"),
        ({**kubeflow_pod(0), "MAX_RESTARTS": "-1"}, "MAX_RESTARTS"),
        ({"PET_RDZV_ENDPOINT": "host-without-port", "PET_NNODES": "2"}, "PET_RDZV_ENDPOINT"),
        ({"PET_RDZV_ENDPOINT": "h:1"}, "PET_NNODES"),
        ({"LOG_RANK": "first"}, "LOG_RANK"),
        ({"OVERRIDE_PET_NNODES": "2"}, "MASTER_ADDR"),  # a node count with nowhere to meet
        ({"MASTER_ADDR": "localhost", "MASTER_PORT": "1"}, "WORLD_SIZE"),
    ],
)
def test_bad_environment_names_the_variable(env, setting):
    with pytest.raises(UserError) as e:
        plan_launch(env, gpu_count=8)
    assert e.value.setting == setting
    assert "Fix:" in e.value.line()


def test_arguments_pass_through_with_quoting_preserved():
    user = ["--training.steps", "5", "--job.description", "two words; $(not run)"]
    args = trainer_args({"CONFIG_FILE": "./x.toml"}, user)
    assert args == ["--job.config_file", "./x.toml", *user]
    assert trainer_args({"CONFIG_FILE": "./x.toml"}, ["--job.config_file=y.toml"]) == ["--job.config_file=y.toml"]


def test_worker_failures_become_one_line_and_the_right_exit_code():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from torchtitan_runai.errors import EXIT_HUNG
    from torchtitan_runai.launcher.launch import EXIT_WORKER_ERROR, describe_failure

    def failure(local_rank, exitcode):
        return ProcessFailure(local_rank=local_rank, pid=100 + local_rank, exitcode=exitcode, error_file="/nonexistent")

    line, code = describe_failure({3: failure(1, -9)})
    assert code == 137 and line.startswith("rank 3 (local rank 1 on ") and "SIGKILL" in line and "OOM" in line
    assert describe_failure({0: failure(0, 2)})[1] == 2
    assert describe_failure({0: failure(0, 143)})[1] == 143
    line, code = describe_failure({1: failure(1, 1)})
    assert code == EXIT_WORKER_ERROR == 1 and "rank 1" in line
    # one value for a hang: the rank's watchdog exits with it and the launcher passes it on
    assert describe_failure({1: failure(1, EXIT_HUNG)})[1] == EXIT_HUNG == 142


def test_shutdown_timeout_flag_only_where_torchrun_has_it():
    from torchtitan_runai.launcher.preflight import torchrun_supports

    plan = plan_launch({"SHUTDOWN_TIMEOUT": "40"}, gpu_count=8)
    assert opt(torchrun_args(plan, []), "--shutdown_timeout") == "40"
    assert "--shutdown_timeout" not in torchrun_args(plan, [], shutdown_flag=False)
    assert torchrun_supports("--shutdown_timeout") and not torchrun_supports("--no_such_flag")


def test_a_watchdog_verdict_wins_over_the_ranks_it_killed():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from torchtitan_runai.errors import EXIT_HUNG
    from torchtitan_runai.launcher.launch import describe_failure

    killed = ProcessFailure(local_rank=1, pid=101, exitcode=-9, error_file="/nonexistent")
    verdict = ("hang detected by rank 0: ...; hung rank(s) 1 (pid 101 on vm, heartbeat stopped)", killed.timestamp - 3)
    line, code = describe_failure({1: killed}, verdict)
    assert code == EXIT_HUNG and "hung rank(s) 1" in line
    stale = (verdict[0], killed.timestamp - 3600)  # from an earlier attempt: not this failure's cause
    assert describe_failure({1: killed}, stale)[1] == 137


def test_preflight_counts_host_memory_per_node_not_per_job(monkeypatch, tmp_path):
    # 2 nodes x 2 processes: pinned staging on one node is 2 ranks' share, not the job's 4
    import os

    from conftest import REPO, pod_env

    from torchtitan_runai.launcher import launch, preflight

    env = pod_env(
        MASTER_ADDR="job-master-0",
        MASTER_PORT="23456",
        RANK="0",
        WORLD_SIZE="4",
        PET_NNODES="2",
        PET_NPROC_PER_NODE="2",
    )
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.chdir(REPO)
    seen = {}
    real = preflight.run_preflight

    def spy(config, world_size, *a, **kw):
        seen.update(world_size=world_size, local_ranks=kw.get("local_ranks"))
        return real(config, world_size, *a, **kw)

    monkeypatch.setattr(preflight, "run_preflight", spy)
    assert launch.main(["--dry-run", "--job.dump_folder", str(tmp_path)]) == 0
    assert seen == {"world_size": 4, "local_ranks": 2}


def test_worker_env_puts_the_compile_cache_on_the_output_volume():
    env = worker_env("/out/run1", {})
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/out/run1/.cache/inductor"
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and env["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    assert env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"


def test_worker_env_never_overrides_the_user():
    env = worker_env("/out", {"TORCHINDUCTOR_CACHE_DIR": "/mine", "PYTORCH_CUDA_ALLOC_CONF": "x"})
    assert "TORCHINDUCTOR_CACHE_DIR" not in env and "PYTORCH_ALLOC_CONF" not in env


# --- issue 16: a node count needs an address; a node rank must be inside the node count --------


@pytest.mark.parametrize("count", [{"PET_NNODES": "2"}, {"PET_NNODES": "1:4"}, {"OVERRIDE_PET_NNODES": "3"}])
def test_node_count_without_rendezvous_address_names_master_addr(count):
    # main trained alone on this node and logged "single node: 1 node(s)"
    with pytest.raises(UserError) as err:
        plan_launch({**count, "PET_NPROC_PER_NODE": "8"}, gpu_count=8)
    assert err.value.setting == "MASTER_ADDR" and "MASTER_PORT" in err.value.fix


def test_one_node_count_without_address_is_still_single_node():
    assert plan_launch({"PET_NNODES": "1"}, gpu_count=8).standalone


@pytest.mark.parametrize(
    "env, setting",
    [
        ({**kubeflow_pod(0), "RANK": "5", "PET_NODE_RANK": "5"}, "PET_NODE_RANK"),
        ({"MASTER_ADDR": "m", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "5"}, "RANK"),
        (
            {"PET_NNODES": "2", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "tj-node-0-0.tj", "PET_MASTER_PORT": "29500"},
            "PET_NODE_RANK",
        ),
    ],
)
def test_node_rank_outside_the_node_count_is_refused(env, setting):
    # main accepted RANK=5 of 2 nodes; torchrun then waited the whole rendezvous timeout
    with pytest.raises(UserError) as err:
        plan_launch(env, gpu_count=8)
    assert err.value.setting == setting and "0..1" in err.value.why


def test_log_level_is_validated():
    assert plan_launch({"LOG_LEVEL": "debug"}, gpu_count=0).standalone
    with pytest.raises(UserError, match="LOG_LEVEL"):
        plan_launch({"LOG_LEVEL": "verbose"}, gpu_count=0)


HEAVY_MODULES = (
    "torch._inductor",
    "torch._dynamo",
    "torchtitan.components.quantization",
    "torchtitan.models",
    "torchtitan.train",
    "datasets",
)
"""What the ranks import (and the old launcher did, for 14 s on an H200 host) and validation needs not."""

RECORD_MODULES = """
import os, sys
_exit = os._exit
def _record_then_exit(code):  # the launcher leaves with os._exit (no atexit): record just before
    open(os.environ["MODULES_RECORD"], "w").write("\\n".join(sorted(sys.modules)))
    _exit(code)
os._exit = _record_then_exit
"""


@pytest.mark.parametrize("recipe, ngpu", [(DEBUG_CONFIG, "2"), ("./train_configs/llama3_8b.toml", "8")])
def test_the_launchers_validation_imports_no_model_compiler_or_datasets(tmp_path, recipe, ngpu):
    """run_llama_train.sh --dry-run validates all of it (config, flavor, data, preflight) with torchtitan's
    config classes alone: every module the launcher's process held when it exited (a sitecustomize
    records them).

    The launcher's side (``torchtitan_runai/launcher/``) imports the base at module level: config, job,
    model_lookup, checkpoint, inputs, hub, storage, goodput and its own modules are light (torchtitan's
    config classes, no torch). What stays imported inside the function that needs it, and why:

    - ``torch`` (``preflight.visible_gpus``) and ``torch.distributed.run`` (``preflight.torchrun_supports``):
      the package does not depend on torch (the image brings it), and ``python -m torchtitan_runai.preflight``
      runs on a laptop without it; with it, ~1000 modules and seconds that the pure parts (``plan_launch``,
      ``torchrun_args``, the config's validation) never need. The launcher itself imports them in a dry run
      too (to count the GPUs, to ask torchrun for its flags), but never torch's compiler.
    - torchrun's agent (``torch.distributed.elastic``, ``torch.distributed.run.run`` in ``launch.run_agent``):
      only when the workers start, never in a dry run or a validation that fails.
    - ``torchtitan_runai.upstream.text_datasets`` (``stage.stage_dataset``): it imports Hugging Face
      ``datasets``, which this test forbids; only for a named dataset.
    - in the base, not the launcher's side: ``huggingface_hub`` (``hub``), which reads ``HF_HOME`` when it
      is imported, so only after the launcher has set it (``launch.apply_storage``), and ``matplotlib``
      (``goodput.report``, ``plots``: the PNGs, seconds a pod would pay at every exit).

    Importing any of these at module level, or a module that imports ``torch._inductor``, ``torch._dynamo``,
    torchtitan's models, trainer or quantization, or ``datasets``, fails this test (``HEAVY_MODULES``):
    the ranks import them, and the launcher paid 14 s for them on an H200 host when it did.
    """
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(RECORD_MODULES)
    record = tmp_path / "modules.txt"
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    proc = run_launcher(
        ["--dry-run"],
        pod_env(
            NGPU=ngpu, CONFIG_FILE=recipe, OUTPUT_DIR=str(tmp_path / "out"), PYTHONPATH=path, MODULES_RECORD=str(record)
        ),
    )
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1].startswith("torchrun "), proc.stderr[-3000:]
    imported = set(record.read_text().splitlines())
    assert {"torch", "torchtitan.config", "torchtitan_runai.job", "torchtitan_runai.launcher.preflight"} <= imported
    assert sorted(m for m in imported if any(m == h or m.startswith(h + ".") for h in HEAVY_MODULES)) == []


# --- issue 24: LOG_RANK past the node's ranks; node/rank variables that come alone --------------


@pytest.mark.parametrize(
    "env, gpus, beyond",
    [
        ({"LOG_RANK": "5", "NGPU": "2"}, 8, "5"),
        ({"LOG_RANK": "0,2", "NGPU": "2"}, 8, "2"),
        ({"LOG_RANK": "8"}, 8, "8"),  # processes from the visible GPUs
        ({**kubeflow_pod(1), "LOG_RANK": "8"}, 8, "8"),  # a multi-node shape: local ranks of this node
    ],
)
def test_log_rank_past_the_nodes_ranks_is_refused(env, gpus, beyond):
    # main accepted LOG_RANK=5 on 2 processes: torchrun's filter hid every rank, no step line at all
    with pytest.raises(UserError) as err:
        plan_launch(env, gpu_count=gpus)
    nproc = int(env.get("NGPU", gpus))
    line = err.value.line()
    assert err.value.setting == "LOG_RANK" and f"local rank {beyond}" in line
    assert f"0..{nproc - 1}" in err.value.fix and "LOG_RANK=all" in err.value.fix


def test_log_rank_inside_the_nodes_ranks_passes():
    assert plan_launch({"LOG_RANK": "0,1", "NGPU": "2"}, gpu_count=8).log_ranks == "0,1"
    assert plan_launch({"LOG_RANK": "all", "NGPU": "1"}, gpu_count=8).log_ranks == "all"


@pytest.mark.parametrize(
    "env, setting",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE"),
        ({"RANK": "1"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "1", "RANK": "1"}, "WORLD_SIZE"),
        ({"MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2"}, "WORLD_SIZE"),  # the address forgotten
    ],
)
def test_world_size_or_rank_without_master_addr_is_refused(env, setting):
    # main ran this node alone, standalone, without a word
    with pytest.raises(UserError) as err:
        plan_launch(env, gpu_count=8)
    assert err.value.setting == setting
    assert "without MASTER_ADDR" in err.value.why and "MASTER_ADDR and MASTER_PORT" in err.value.fix
    assert f"unset {setting}" in err.value.fix


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "1"}, {"RANK": "0"}, {"WORLD_SIZE": "1", "RANK": "0"}])
def test_one_node_world_size_and_rank_still_run_standalone(env):
    assert plan_launch(env, gpu_count=8).standalone


def test_every_cluster_shape_with_world_size_or_rank_still_plans():
    # the shapes of cluster-env.md that carry WORLD_SIZE / RANK all carry MASTER_ADDR too
    for env in (
        kubeflow_pod(0),
        kubeflow_pod(1),
        kubeflow_pod(1, nproc="auto"),
        {"MASTER_ADDR": "localhost", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "0"},
        {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2"},
    ):
        assert not plan_launch(env, gpu_count=8).standalone


def test_dry_run_on_the_runai_v2_spec_finds_the_token_file(monkeypatch, tmp_path, capfd):
    # issue 23: the v2 spec mounts the Secret and sets HF_TOKEN_PATH; the dry run said the download
    # would go "without HF_TOKEN"
    from conftest import REPO

    from torchtitan_runai.launcher import launch, preflight

    secret = "hf_" + "z" * 30
    token_file = tmp_path / "secret" / "HF_TOKEN"
    token_file.parent.mkdir()
    token_file.write_text(secret + "\n")
    monkeypatch.setattr(os, "environ", pod_env(NGPU="2", HF_TOKEN_PATH=str(token_file)))
    os.environ.pop("HF_TOKEN", None)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(preflight, "visible_gpus", lambda: 0)
    hub_args = ["--hub.repo_id", "meta-llama/Llama-3.1-8B", "--model.hf_assets_path", str(tmp_path / "none")]
    hub_args += ["--hub.cache_dir", str(tmp_path / "cache"), "--job.dump_folder", str(tmp_path / "out")]
    capfd.readouterr()
    assert launch.main(["--dry-run", *hub_args]) == 0
    out, err = capfd.readouterr()
    assert f"token from HF_TOKEN_PATH ({token_file})" in err, err
    assert "without" not in err and secret not in out + err


# --- issue 24: a relative CONFIG_FILE from another directory ------------------------------------


def test_a_relative_config_resolves_against_the_callers_directory(tmp_path, monkeypatch):
    from conftest import REPO

    monkeypatch.chdir(REPO)  # where run_llama_train.sh runs the launcher
    (tmp_path / "mine.toml").write_text("")
    env = {"TORCHTITAN_RUNAI_CALLER_DIR": str(tmp_path)}
    mine = str(tmp_path / "mine.toml")
    assert trainer_args({**env, "CONFIG_FILE": "mine.toml"}, []) == ["--job.config_file", mine]
    assert trainer_args(env, ["--job.config_file", "mine.toml", "--x"]) == ["--job.config_file", mine, "--x"]
    assert trainer_args(env, ["--job.config-file=mine.toml"]) == [f"--job.config-file={mine}"]
    # only in the repository (the recipes), absolute, or the default: as given
    recipe = "./train_configs/debug_model.toml"
    assert trainer_args({**env, "CONFIG_FILE": recipe}, []) == ["--job.config_file", recipe]
    assert trainer_args({**env, "CONFIG_FILE": mine}, []) == ["--job.config_file", mine]
    assert trainer_args(env, [])[1] == "./train_configs/llama3_8b.toml"
    # called from the repository itself: unchanged
    here = {"TORCHTITAN_RUNAI_CALLER_DIR": str(REPO), "CONFIG_FILE": recipe}
    assert trainer_args(here, []) == ["--job.config_file", recipe]


def test_a_relative_config_found_nowhere_names_both_directories(tmp_path, monkeypatch):
    from conftest import REPO

    monkeypatch.chdir(REPO)
    env = {"TORCHTITAN_RUNAI_CALLER_DIR": str(tmp_path), "CONFIG_FILE": "nope.toml"}
    with pytest.raises(UserError) as err:
        trainer_args(env, [])
    assert err.value.setting == "CONFIG_FILE" and str(tmp_path) in err.value.why and str(REPO) in err.value.why


def test_the_script_reads_a_relative_config_file_from_where_it_was_called(tmp_path):
    # main: "CONFIG_FILE = my.toml: the config file does not exist" (the script changes directory first)
    from conftest import REPO

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "my.toml").write_text((REPO / "train_configs" / "debug_model.toml").read_text())
    env = pod_env(NGPU="2", CONFIG_FILE="configs/my.toml")
    proc = subprocess.run(
        ["bash", str(REPO / "run_llama_train.sh"), "--dry-run", "--job.dump_folder", str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--job.config_file " + str(tmp_path / "configs" / "my.toml") in proc.stdout.splitlines()[-1]


# --- issue 22: context parallel on CPU is refused before any worker starts -----------------------

CP2 = ["--parallelism.context_parallel_degree", "2"]


@pytest.fixture
def cp_pod(monkeypatch, tmp_path):
    """launch.main in this process, as a 2-process pod whose GPUs ``gpus(n)`` fakes; torchrun's agent
    replaced by a recorder (``started``: the commands it was given)."""
    from conftest import REPO

    from torchtitan_runai.launcher import launch, preflight

    monkeypatch.setattr(os, "environ", pod_env(NGPU="2"))
    monkeypatch.chdir(REPO)
    started: list[list[str]] = []
    monkeypatch.setattr(launch, "run_agent", lambda command, *a, **kw: started.append(command) or 0)
    monkeypatch.setattr(preflight, "detect_gpu_memory_gib", lambda: 79.6)  # an H100's, where GPUs are faked

    def gpus(n: int) -> None:
        monkeypatch.setattr(preflight, "visible_gpus", lambda: n)

    def main(*args: str) -> int:
        return launch.main([*args, "--job.dump_folder", str(tmp_path / "out"), *CP2])

    return SimpleNamespace(gpus=gpus, main=main, started=started, out=tmp_path / "out")


def test_context_parallel_without_a_gpu_is_refused_before_any_worker(cp_pod):
    # it was a traceback in every rank at step 1: aten._scaled_dot_product_flash_attention_for_cpu has
    # no sharding strategy (torch's ring attention covers only CUDA attention kernels)
    cp_pod.gpus(0)
    with pytest.raises(UserError) as error:
        cp_pod.main()
    assert error.value.setting == "parallelism.context_parallel_degree" and error.value.value == 2
    assert "none is visible" in error.value.why and "--parallelism.context_parallel_degree 1" in error.value.fix
    assert cp_pod.started == [] and not cp_pod.out.exists()  # no worker, nothing written


def test_context_parallel_without_a_gpu_is_a_warning_in_a_dry_run(cp_pod, capsys):
    # like NGPU against the visible GPUs: the machine that trains may have them
    cp_pod.gpus(0)
    assert cp_pod.main("--dry-run") == 0
    out, err = capsys.readouterr()
    assert "[launch] warning: parallelism.context_parallel_degree = 2: context parallel needs GPUs" in err
    assert out.splitlines()[-1].startswith("torchrun ") and cp_pod.started == []


def test_context_parallel_on_gpus_stays_allowed(cp_pod, capsys):
    cp_pod.gpus(2)
    assert cp_pod.main("--dry-run") == 0
    assert "context_parallel_degree" not in capsys.readouterr().err
    assert cp_pod.main() == 0
    assert len(cp_pod.started) == 1 and " ".join(CP2) in " ".join(cp_pod.started[0])


def test_context_parallel_on_this_cpu_machine_is_one_line_from_the_real_launcher(tmp_path):
    proc = run_launcher(["--job.dump_folder", str(tmp_path / "out"), *CP2], pod_env(NGPU="2"), timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        "run_llama_train.sh: error: parallelism.context_parallel_degree = 2: context parallel needs GPUs and "
        "none is visible: the ranks would train on CPU, where torch's ring attention has no kernel (it shards "
        "only CUDA attention), and step 1 would fail. Fix: run on GPUs, or pass "
        "--parallelism.context_parallel_degree 1 for a CPU run"
    ]
    assert not (tmp_path / "out").exists()  # no worker started: not even the dump folder


def test_a_warmup_longer_than_the_run_is_one_launcher_warning_not_a_refusal(capsys, monkeypatch, tmp_path):
    # torchtitan cuts the warmup and says so only in every rank's log once the workers run; a short
    # smoke run of a recipe (--training.steps 3 on a 5-step warmup) is still allowed
    from conftest import REPO

    from torchtitan_runai.launcher import launch

    monkeypatch.setattr(os, "environ", pod_env(NGPU="2"))
    monkeypatch.chdir(REPO)
    assert launch.main(["--dry-run", "--job.dump_folder", str(tmp_path / "out"), "--training.steps", "3"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warmup_steps" in line]
    assert len(warnings) == 1 and warnings[0].startswith("[launch] warning: lr_scheduler.warmup_steps = 5")
    assert "Fix: set lr_scheduler.warmup_steps to at most 3" in warnings[0]


def test_the_last_line_says_what_to_do_next(tmp_path, monkeypatch):
    from ckpt_util import write_ckpt
    from conftest import REPO

    from torchtitan_runai import storage
    from torchtitan_runai.job import parse_job_config
    from torchtitan_runai.launcher.launch import CALLER_DIR_ENV, next_line

    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    config = parse_job_config(["--job.config_file", DEBUG_CONFIG, "--job.dump_folder", str(out)], world_size=2)
    step = write_ckpt(storage.checkpoint_dir(config), 30)
    plot = storage.plot_file(storage.tensorboard_dir(config))
    plot.parent.mkdir(parents=True)
    plot.write_bytes(b"\x89PNG")
    assert next_line(config, {}) == (
        f"next: export the weights for Hugging Face: python -m torchtitan_runai.export {step} {out}/hf "
        f"--config {DEBUG_CONFIG}; loss curves {plot}; goodput breakdown: python -m torchtitan_runai.goodput {out}"
    )
    # called from another directory: the repository's relative paths as absolute ones
    elsewhere = next_line(config, {CALLER_DIR_ENV: str(tmp_path)})
    assert f"--config {REPO / 'train_configs' / 'debug_model.toml'};" in elsewhere
    config.export.at_end = True  # the export was written at the end: where it is
    (out / "hf").mkdir()
    (out / "hf" / "config.json").write_text("{}")
    assert next_line(config, {}).startswith(f"next: the Hugging Face model is in {out}/hf; loss curves ")
    # a dump folder written `./x` is shown as the export's folder is: `x`, one spelling in one line
    monkeypatch.chdir(tmp_path)
    config.job.dump_folder = "./out"
    assert next_line(config, {}) == (
        "next: the Hugging Face model is in out/hf; loss curves out/tb/training_curves.png; "
        "goodput breakdown: python -m torchtitan_runai.goodput out"
    )
