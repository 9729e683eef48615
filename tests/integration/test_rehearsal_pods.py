"""The rehearsal as users run it: real launchers, real torchrun, real gloo rendezvous on loopback."""

import re
import subprocess

from conftest import REPO, free_port, launcher_cmd, losses, pod_env


def kubeflow_env(index: int, port: int) -> dict[str, str]:
    """training-operator v1.9's env for pod `index` of a 2-pod PyTorchJob, master on loopback."""
    return pod_env(
        MASTER_ADDR="127.0.0.1",
        PET_MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PET_MASTER_PORT=str(port),
        RANK=str(index),
        PET_NODE_RANK=str(index),
        WORLD_SIZE="2",
        PET_NNODES="2",
        PET_NPROC_PER_NODE="1",
    )


def test_two_pods_train_over_loopback(tmp_path):
    port = free_port()
    dump = tmp_path / "dump"
    args = ["--job.dump_folder", str(dump), "--training.steps", "8", "--checkpoint.interval", "4"]
    pods = [
        subprocess.Popen(
            launcher_cmd(*args),
            env=kubeflow_env(i, port),
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in pods]
    for pod, out in zip(pods, outputs):
        assert pod.returncode == 0, out[-4000:]
        assert "Kubeflow PyTorchJob / Run:ai: 2 node(s) x 1 process(es)" in out
        assert f"rendezvous 127.0.0.1:{port}" in out
    master = losses(outputs[0])
    assert sorted(master) == list(range(1, 9))
    assert master[8] < master[1] - 0.5, master  # it learns
    assert losses(outputs[1]) == master  # the worker pod's rank logs the same global loss
    assert {p.name for p in (dump / "checkpoint").iterdir()} >= {"step-4", "step-8"}
    assert (dump / "checkpoint" / "step-8" / ".metadata").is_file()


def test_single_node_two_ranks_share_a_logged_32bit_seed(trained_run):
    out = trained_run["stdout"] + trained_run["stderr"]
    assert "single node: 1 node(s) x 2 process(es)" in out
    seeds = re.findall(r"\[rank(\d)\]:.*seed: (\d+)$", out, flags=re.M)  # each rank's, at LOG_LEVEL=debug
    assert {rank for rank, _ in seeds} == {"0", "1"}
    assert len({seed for _, seed in seeds}) == 1
    assert 0 <= int(seeds[0][1]) < 2**32
    steps = losses(out)
    assert steps[12] < steps[1]
    assert {p.name for p in trained_run["checkpoint"].iterdir()} >= {"step-6", "step-12"}


def test_logged_seed_reproduces_the_run(trained_run, tmp_path):
    out = trained_run["stdout"]
    seed = re.search(r"seed: (\d+)  deterministic=", out, flags=re.M).group(1)  # the start-up summary's
    proc = subprocess.run(
        launcher_cmd(
            "--job.dump_folder",
            str(tmp_path / "again"),
            "--training.steps",
            "12",
            "--checkpoint.interval",
            "6",
            "--debug.seed",
            seed,
        ),
        env=pod_env(NGPU="2"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = losses(out)
    again = losses(proc.stdout)
    assert [again[s] for s in range(1, 13)] == [first[s] for s in range(1, 13)]
