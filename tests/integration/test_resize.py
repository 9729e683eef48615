"""Resume on another node count, with real processes: the launcher, torchrun, gloo on loopback.

Each case copies the step-2 checkpoint of an uninterrupted 4-step run at data-parallel size N and
resumes it at size M. ``TORCHTITAN_RUNAI_DATA_TRACE`` records, on every rank, each window trained
(lane, window index = step - 1, a hash of its tokens) and each step's loss share and learning rate.
Proven per case:

- windows: the reference run's steps 1-2 plus the resumed run's steps 3-4 are exactly the reference
  run's windows, each once (no repeats, no gaps), and rank r of M read lanes [rG/M, (r+1)G/M);
- loss: the resumed steps' loss (sum of the ranks' shares) equals the reference run's within
  ``REL_TOL`` — the float32 difference of another summation order (gradients all-reduced over M
  instead of N ranks, other microbatches); measured differences are ~6e-8 relative;
- learning rate: bit-equal to the reference at every step, on every rank.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import REPO, free_port, launcher_cmd, pod_env

STEPS, AT, GLOBAL_BATCH = 4, 2, 4
REL_TOL = 1e-5
SEED = "1234"


def train_args(tmp, *more: str) -> list[str]:
    return [
        "--job.dump_folder",
        str(tmp / "out"),
        "--training.steps",
        str(STEPS),
        "--lr_scheduler.warmup_steps",  # the debug recipe's 5 would outlast the run
        str(STEPS),
        "--checkpoint.interval",
        str(AT),
        "--metrics.log_freq",
        "1",
        "--debug.seed",
        SEED,
        *more,
    ]


def env(tmp, **extra) -> dict[str, str]:
    return pod_env(TORCHTITAN_RUNAI_DATA_TRACE=str(tmp / "trace.jsonl"), LOG_RANK="all", **extra)


def launch(tmp, ngpu: int, *more: str) -> str:
    tmp.mkdir(exist_ok=True)
    proc = subprocess.run(
        launcher_cmd(*train_args(tmp, *more)),
        env=env(tmp, NGPU=str(ngpu)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def pod(index: int, nnodes: int, port: int, tmp, *more: str) -> subprocess.Popen:
    """A Kubeflow PyTorchJob / Run:ai pod of ``nnodes`` (1 process each), master on loopback."""
    e = env(
        tmp,
        MASTER_ADDR="127.0.0.1",
        PET_MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PET_MASTER_PORT=str(port),
        RANK=str(index),
        PET_NODE_RANK=str(index),
        WORLD_SIZE=str(nnodes),
        PET_NNODES=str(nnodes),
        PET_NPROC_PER_NODE="1",
    )
    return subprocess.Popen(
        launcher_cmd(*train_args(tmp, *more)),
        env=e,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def launch_pods(tmp, nnodes: int, *more: str) -> str:
    port = free_port()
    pods = [pod(i, nnodes, port, tmp, *more) for i in range(nnodes)]
    outputs = [p.communicate(timeout=300)[0] for p in pods]
    for p, out in zip(pods, outputs):
        assert p.returncode == 0, out[-4000:]
    return "\n".join(outputs)


def read_trace(tmp) -> tuple[dict, dict]:
    """({(lane, window): [(rank, sha), ...]}, {step: [record per rank]})."""
    windows: dict = {}
    steps: dict = {}
    for line in (tmp / "trace.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "lane" in rec:
            windows.setdefault((rec["lane"], rec["window"]), []).append((rec["rank"], rec["sha"]))
        else:
            steps.setdefault(rec["step"], []).append(rec)
    return windows, steps


def step_loss(records: list[dict]) -> float:
    return sum(float.fromhex(r["loss"]) for r in records)


def reference(tmp_path_factory, name: str, run) -> dict:
    tmp = tmp_path_factory.mktemp(name)
    out = run(tmp)
    windows, steps = read_trace(tmp)
    assert sorted(windows) == [(lane, w) for lane in range(GLOBAL_BATCH) for w in range(STEPS)]
    assert all(len(seen) == 1 for seen in windows.values())
    return {"dir": tmp, "windows": windows, "steps": steps, "out": out}


@pytest.fixture(scope="module")
def ref2(tmp_path_factory):
    """4 steps at 2 ranks, local batch 2 (global batch 4), checkpoints at 2 and 4."""
    return reference(tmp_path_factory, "ref2", lambda tmp: launch(tmp, 2, "--training.local_batch_size", "2"))


@pytest.fixture(scope="module")
def ref1(tmp_path_factory):
    """The same at 1 rank, local batch 4, the corpus streamed (``data.streaming``: c4's code path)."""
    return reference(
        tmp_path_factory, "ref1", lambda tmp: launch(tmp, 1, "--training.local_batch_size", "4", "--data.streaming")
    )


@pytest.fixture(scope="module")
def ref_pods(tmp_path_factory):
    """The same as two pods of 1 process, through the launcher, rendezvous on loopback."""
    return reference(tmp_path_factory, "pods", lambda tmp: launch_pods(tmp, 2, "--training.local_batch_size", "2"))


def from_checkpoint(ref: dict, tmp) -> None:
    """The reference's folder as it was after step AT (its later checkpoint removed)."""
    shutil.copytree(ref["dir"] / "out", tmp / "out")
    for later in range(AT + 1, STEPS + 1):
        shutil.rmtree(tmp / "out" / "checkpoint" / f"step-{later}", ignore_errors=True)


def check_resumed(ref: dict, tmp, out: str, n: int, m: int, local: int, accumulation: int) -> None:
    line = (
        f"resuming at data-parallel {m} (checkpoint written at {n}): global batch {GLOBAL_BATCH} kept, "
        f"local batch {local} × accumulation {accumulation}, data position {AT * GLOBAL_BATCH} sequences"
    )
    assert line in out, out[-4000:]
    windows, steps = read_trace(tmp)
    # after the change: every lane's windows AT.. exactly once, each lane read by its owner under M
    assert sorted(windows) == [(lane, w) for lane in range(GLOBAL_BATCH) for w in range(AT, STEPS)]
    per_rank = GLOBAL_BATCH // m
    for (lane, _), seen in windows.items():
        assert [rank for rank, _ in seen] == [lane // per_rank]
    before = {k: v[0][1] for k, v in ref["windows"].items() if k[1] < AT}
    after = {k: v[0][1] for k, v in windows.items()}
    assert not before.keys() & after.keys()  # nothing trained twice
    assert {**before, **after} == {k: v[0][1] for k, v in ref["windows"].items()}  # nor skipped
    assert sorted(steps) == list(range(AT + 1, STEPS + 1))
    for step in steps:
        assert len(steps[step]) == m
        assert step_loss(steps[step]) == pytest.approx(step_loss(ref["steps"][step]), rel=REL_TOL)
        lrs = {r["lr"] for r in steps[step]} | {r["lr"] for r in ref["steps"][step]}
        assert len(lrs) == 1, (step, lrs)


@pytest.mark.slow
def test_two_ranks_resume_on_one(ref2, tmp_path):
    from_checkpoint(ref2, tmp_path)
    out = launch(tmp_path, 1, "--training.local_batch_size", "2")
    check_resumed(ref2, tmp_path, out, 2, 1, local=2, accumulation=2)


@pytest.mark.slow
def test_one_rank_resumes_on_two(ref1, tmp_path):
    from_checkpoint(ref1, tmp_path)
    out = launch(tmp_path, 2, "--training.local_batch_size", "4", "--data.streaming")  # same command, on 2
    check_resumed(ref1, tmp_path, out, 1, 2, local=2, accumulation=1)


@pytest.mark.slow
def test_two_ranks_resume_on_four(ref2, tmp_path):
    from_checkpoint(ref2, tmp_path)
    out = launch(tmp_path, 4, "--training.local_batch_size", "2")
    check_resumed(ref2, tmp_path, out, 2, 4, local=1, accumulation=1)


@pytest.mark.slow
def test_two_pods_resume_as_one_pod(ref_pods, tmp_path):
    from_checkpoint(ref_pods, tmp_path)
    out = launch_pods(tmp_path, 1, "--training.local_batch_size", "2")
    check_resumed(ref_pods, tmp_path, out, 2, 1, local=2, accumulation=2)


def test_a_size_that_cannot_keep_the_global_batch_is_refused(ref2, tmp_path):
    from_checkpoint(ref2, tmp_path)
    proc = subprocess.run(
        launcher_cmd(*train_args(tmp_path, "--training.local_batch_size", "2")),
        env=env(tmp_path, NGPU="3"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "world size = '2 -> 3'" in proc.stderr and "global batch of 4 sequences" in proc.stderr
    assert "1 (world size 1), 2 (world size 2), 4 (world size 4)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "trace.jsonl").exists()  # no worker started


@pytest.mark.slow
def test_per_rank_checkpoint_resumes_at_its_size_and_is_refused_at_another(tmp_path):
    """A checkpoint with torchtitan's per-rank loader state (as before global positions)."""
    ref = tmp_path / "ref"
    launch(ref, 1, "--data.order", "per-rank")
    _, ref_steps = read_trace(ref)
    resumed = tmp_path / "resumed"
    from_checkpoint({"dir": ref}, resumed)
    out = launch(resumed, 1)  # the default order: the checkpoint's per-rank state decides
    _, steps = read_trace(resumed)
    assert "resuming from step 2" in out
    assert {s: step_loss(r) for s, r in steps.items()} == {s: step_loss(ref_steps[s]) for s in (3, 4)}
    refused = tmp_path / "refused"
    from_checkpoint({"dir": ref}, refused)
    proc = subprocess.run(
        launcher_cmd(*train_args(refused)),
        env=env(refused, NGPU="2"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "world size = '1 -> 2'" in proc.stderr and "per-rank data positions" in proc.stderr
    assert "initial_load_model_only" in proc.stderr and "Traceback" not in proc.stderr
