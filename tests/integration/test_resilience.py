"""Resilience with real processes: 2 CPU ranks over gloo, real signals, the real launcher.

Every training run here goes through ./run_llama_train.sh -> torchrun -> train.py, with the debug
model, and compares exact per-step losses (float.hex, from TORCHTITAN_RUNAI_STEP_TRACE).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
from resilience_util import losses, run, start, trace_steps, train_args, wait_for_step, worker_pids

from torchtitan_runai.goodput.ledger import read_records
from torchtitan_runai.goodput.report import summarize
from torchtitan_runai.training.checkpoint.manager import saved_keys

SEED = ["--debug.seed", "1234"]
STEPS, INTERVAL = 10, 5


@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
    """An uninterrupted 10-step run (checkpoints at 5 and 10): reference losses and a folder to copy."""
    tmp = tmp_path_factory.mktemp("baseline")
    rc, log = run(tmp, train_args(tmp, STEPS, INTERVAL, *SEED))
    assert rc == 0, log[-3000:]
    assert "no complete checkpoint" in log and "starting fresh" in log
    return tmp, losses(tmp)


def copy_run(baseline_dir, tmp):
    shutil.copytree(baseline_dir / "out", tmp / "out")


@pytest.mark.slow
def test_sigterm_saves_full_checkpoint_exits_143_and_resumes_exactly(baseline, tmp_path):
    _, reference = baseline
    p = start(tmp_path, train_args(tmp_path, STEPS, INTERVAL, *SEED), JOB_NAME="job-a")
    wait_for_step(tmp_path, 3, p)
    sent = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = p.wait(60)
    took = time.monotonic() - sent
    log = (tmp_path / "log.txt").read_text()
    assert rc == 143, log[-3000:]
    assert took < 30, f"exit took {took:.1f}s, beyond Kubernetes' default 30 s grace period"
    print(f"SIGTERM -> launcher exit: {took:.2f}s")
    saved = sorted((tmp_path / "out/checkpoint").glob("step-*"))
    assert saved, "no checkpoint saved on SIGTERM"
    stopped = max(int(p.name.split("-")[1]) for p in saved)
    assert 3 <= stopped < STEPS
    marker = json.loads((tmp_path / f"out/checkpoint/step-{stopped}/.complete.json").read_text())
    assert marker["kind"] == "full" and marker["dp_degree"] == 2
    keys = saved_keys(tmp_path / f"out/checkpoint/step-{stopped}")
    # the global data position: once, plus 2 ranks x local batch 4 = 8 lanes (training/data_position)
    assert {
        "rng.rank0.cpu",
        "rng.rank1.cpu",
        "dataloader.position",
        "dataloader.lane_000000",
        "dataloader.lane_000007",
        "lr_scheduler",
    } <= {k.split(".")[0] if k.startswith("lr_scheduler") else k for k in keys}
    # the pod comes back: same job, same folder, a stale lock from the killed launcher
    rc, log = run(tmp_path, train_args(tmp_path, STEPS, INTERVAL, *SEED), log_name="resume.txt", JOB_NAME="job-a")
    assert rc == 0, log[-3000:]
    assert f"resuming from step {stopped} (" in log
    assert losses(tmp_path) == reference  # bit for bit, steps 1..10


@pytest.mark.slow
def test_kill9_of_a_rank_restarts_repeatedly_and_resumes_exactly(baseline, tmp_path):
    _, reference = baseline
    kills = 3
    p = start(tmp_path, train_args(tmp_path, STEPS, 2, *SEED), MAX_RESTARTS=kills + 1)
    for attempt in range(kills):
        wait_for_step(tmp_path, 2 * attempt + 3, p, restart=attempt)
        pids = worker_pids(p.pid)
        assert 1 in pids, pids
        os.kill(pids[1], signal.SIGKILL)
        wait_for_step(tmp_path, 1, p, restart=attempt + 1)  # the restarted group trains again
    rc = p.wait(240)
    log = (tmp_path / "log.txt").read_text()
    assert rc == 0, log[-4000:]
    restarts = {r["restart"] for r in trace_steps(tmp_path)}
    assert restarts == set(range(kills + 1)), f"expected {kills} restarts, saw {restarts}"
    assert log.count("resuming from step") >= kills
    assert losses(tmp_path) == reference
    # the goodput ledger: one launch, one record per rank-0 process, every second in one category
    records = read_records(tmp_path / "out/checkpoint/goodput")
    assert [r["kind"] for r in records].count("launch") == 1
    assert [r["kind"] for r in records].count("segment") == kills + 1
    summary = summarize(records)
    assert summary["accounted_s"] == pytest.approx(summary["span_s"]) and summary["seconds"]["away"] == 0


@pytest.mark.slow
def test_truncated_newest_checkpoint_is_skipped_and_schedule_change_warned(baseline, tmp_path):
    base_dir, reference = baseline
    copy_run(base_dir, tmp_path)
    shard = tmp_path / "out/checkpoint/step-10/__1_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    (tmp_path / "trace.jsonl").unlink(missing_ok=True)
    rc, log = run(tmp_path, train_args(tmp_path, 12, INTERVAL, *SEED))
    assert rc == 0, log[-3000:]
    assert "skipping incomplete checkpoint" in log and "truncated" in log
    assert "resuming from step 5 (" in log
    assert "training.steps 10 -> 12" in log and "--lr_scheduler.total_steps 10" in log
    assert list((tmp_path / "out/checkpoint/.incomplete").glob("step-10.*"))
    assert (tmp_path / "out/checkpoint/step-5/.complete.json").exists()  # never touched
    with_same_schedule = losses(tmp_path)
    assert with_same_schedule[6] == reference[6]  # LR at step 6 is still in warmup: identical
    assert set(with_same_schedule) == set(range(6, 13))


def test_finished_run_is_reported_complete_without_starting_workers(baseline, tmp_path):
    copy_run(baseline[0], tmp_path)
    rc, log = run(tmp_path, train_args(tmp_path, STEPS, INTERVAL, *SEED))
    assert rc == 0
    assert "the run is complete, nothing to train" in log
    assert "torchrun" not in log.split("nothing to train")[1]
    assert not (tmp_path / "trace.jsonl").exists()


def test_changed_data_parallel_degree_that_cannot_keep_the_global_batch_stops(baseline, tmp_path):
    """Other node counts resume (tests/integration/test_resize.py); one that does not divide the
    global batch (2 ranks x local batch 4 = 8) stops before any worker starts."""
    copy_run(baseline[0], tmp_path)
    rc, log = run(tmp_path, train_args(tmp_path, 12, INTERVAL), NGPU=3)
    assert rc == 2, log[-2000:]
    assert "world size = '2 -> 3'" in log and "global batch of 8 sequences" in log
    assert "Traceback" not in log


def test_other_job_is_refused_and_can_take_over(baseline, tmp_path):
    copy_run(baseline[0], tmp_path)
    rc, log = run(tmp_path, train_args(tmp_path, STEPS, INTERVAL), JOB_UUID="0000-other")
    assert rc == 2 and "belongs to another job" in log and "--resilience.take_over_folder" in log
    owner = json.loads((tmp_path / "out/checkpoint/job.json").read_text())
    rc, log = run(
        tmp_path, train_args(tmp_path, STEPS, INTERVAL, "--resilience.take_over_folder"), JOB_UUID="0000-other"
    )
    assert rc == 0 and "the run is complete" in log
    now = json.loads((tmp_path / "out/checkpoint/job.json").read_text())
    assert now["job"] == "0000-other" and now["previous"]["job"] == owner["job"]
    rc, log = run(tmp_path, train_args(tmp_path, STEPS, INTERVAL), JOB_UUID="0000-other")  # its restart
    assert rc == 0, log[-2000:]


@pytest.mark.slow
def test_hung_rank_is_named_and_job_fails_fast(tmp_path):
    timeout = 6
    p = start(
        tmp_path,
        train_args(
            tmp_path, 200, 100, "--resilience.hang_timeout_seconds", str(timeout), "--resilience.heartbeat_seconds", "1"
        ),
        MAX_RESTARTS=0,
    )
    wait_for_step(tmp_path, 3, p)
    hung = worker_pids(p.pid)[1]
    os.kill(hung, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        rc = p.wait(90)
    finally:
        try:
            os.kill(hung, signal.SIGKILL)
        except ProcessLookupError:
            pass
    took = time.monotonic() - stopped
    log = (tmp_path / "log.txt").read_text()
    print(f"hang (SIGSTOP) -> launcher exit: {took:.1f}s (timeout {timeout}s; stock: ~130s)")
    assert rc == 142, log[-3000:]
    assert "hung rank(s) 1 (pid" in log
    assert "[launch] training failed" in log and "hung rank(s) 1" in log.split("[launch] training failed")[1]
    assert took < timeout + 20
    (segment,) = [r for r in read_records(tmp_path / "out/checkpoint/goodput") if r["kind"] == "segment"]
    assert segment["outcome"] == "hung" and segment["seconds"]["hang"] >= timeout - 1  # the ledger's verdict too


@pytest.mark.slow
def test_finished_runs_exit_0_every_time(tmp_path):
    runs = 6
    for i in range(runs):
        run_dir = tmp_path / str(i)
        run_dir.mkdir()
        rc, log = run(run_dir, train_args(run_dir, 2, 1, "--checkpoint.no-enable"))
        assert rc == 0, f"run {i} exited {rc}: {log[-2000:]}"


@pytest.mark.slow
def test_ctrl_c_during_async_saves_finishes_them_and_saves_a_full_checkpoint(tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole process group (launcher and ranks)."""
    p = start(tmp_path, train_args(tmp_path, 40, 2, *SEED, "--checkpoint.async_mode", "async"))
    wait_for_step(tmp_path, 5, p)
    os.killpg(p.pid, signal.SIGINT)
    rc = p.wait(60)
    log = (tmp_path / "log.txt").read_text()
    assert rc == 130, log[-3000:]
    folders = sorted((tmp_path / "out/checkpoint").glob("step-*"), key=lambda f: int(f.name.split("-")[1]))
    assert folders and int(folders[-1].name.split("-")[1]) >= 5
    for folder in folders:  # the in-flight async save was finished and marked too
        marker = json.loads((folder / ".complete.json").read_text())
        assert marker["kind"] == "full"
