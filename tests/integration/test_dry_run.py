"""`run_llama_train.sh --dry-run` for every environment shape: the real script, in a subprocess."""

import shlex

import pytest
from conftest import REPO, pod_env, run_launcher

from torchtitan_runai.launcher.launch import plan_launch, torchrun_args, trainer_args

CANARY = "hf_CANARYtokenDoNotLeak1234567890"

SHAPES = {
    "runai-master": dict(
        MASTER_ADDR="job-master-0",
        PET_MASTER_ADDR="job-master-0",
        MASTER_PORT="23456",
        PET_MASTER_PORT="23456",
        RANK="0",
        PET_NODE_RANK="0",
        WORLD_SIZE="4",
        PET_NNODES="2",
        PET_NPROC_PER_NODE="2",
    ),
    "runai-worker": dict(
        MASTER_ADDR="job-master-0",
        PET_MASTER_ADDR="job-master-0",
        MASTER_PORT="23456",
        PET_MASTER_PORT="23456",
        RANK="1",
        PET_NODE_RANK="1",
        WORLD_SIZE="4",
        PET_NNODES="2",
        PET_NPROC_PER_NODE="2",
    ),
    "old-operator-master": dict(MASTER_ADDR="localhost", MASTER_PORT="23456", WORLD_SIZE="2", RANK="0", NGPU="2"),
    "elastic": dict(
        PET_RDZV_ENDPOINT="job-worker-0:29400",
        PET_RDZV_BACKEND="c10d",
        PET_NNODES="2:2",
        PET_NPROC_PER_NODE="2",
        PET_MAX_RESTARTS="3",
    ),
    "trainer-v2": dict(
        PET_NNODES="2",
        PET_NPROC_PER_NODE="2",
        PET_NODE_RANK="1",
        PET_MASTER_ADDR="tj-node-0-0.tj",
        PET_MASTER_PORT="29500",
    ),
    "single-node": dict(NGPU="2"),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_dry_run_prints_the_torchrun_command_last(shape, tmp_path):
    env = pod_env(HF_TOKEN=CANARY, **SHAPES[shape])
    user = ["--job.dump_folder", str(tmp_path), "--training.steps", "5", "--job.description", "a b"]
    proc = run_launcher(["--dry-run", *user], env)
    assert proc.returncode == 0, proc.stderr
    expected = torchrun_args(plan_launch(env, gpu_count=0), trainer_args(env, user))
    assert proc.stdout.rstrip("\n").splitlines()[-1] == shlex.join(expected)
    assert shlex.split(proc.stdout.splitlines()[-1])[-2:] == ["--job.description", "a b"]
    assert CANARY not in proc.stdout + proc.stderr
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_dry_run_of_a_finished_run_still_prints_the_command(trained_run):
    env = pod_env(NGPU="2")
    proc = run_launcher(["--dry-run", "--job.dump_folder", str(trained_run["dump"]), "--training.steps", "12"], env)
    assert proc.returncode == 0, proc.stderr
    assert "the run is complete" in proc.stdout
    assert shlex.split(proc.stdout.splitlines()[-1])[0] == "torchrun"


@pytest.mark.parametrize(
    "env, setting",
    [
        (dict(MASTER_ADDR="job-master-0", PET_NNODES="x2", MASTER_PORT="1"), "PET_NNODES"),
        (dict(MASTER_ADDR="job-master-0", PET_NNODES="2"), "MASTER_PORT"),
        (dict(CONFIG_FILE="./train_configs/nope.toml"), "CONFIG_FILE"),
    ],
)
def test_bad_environment_is_one_line_exit_2(env, setting):
    proc = run_launcher(["--dry-run"], pod_env(HF_TOKEN=CANARY, **env))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and setting in lines[0] and "Fix:" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and CANARY not in proc.stderr + proc.stdout
    assert REPO.exists()
