"""The goodput ledger across a preemption and a kill -9 restart: real launcher, 2 CPU ranks, real signals.

One job, three pods: the first gets SIGTERM mid-interval (exit 143 after the preemption save),
the second is killed with SIGKILL (launcher, ranks and their checkpoint-writing processes, as a
node loss would) five steps after a complete checkpoint, the third finishes. Between pods the test
waits ``GAP`` seconds, the time Kubernetes would take to start the successor. The checkpoint mode
is the shipped GPU recipes' ``async_with_pinned_mem`` (unpinned on CPU). What differs from a
cluster: the pods are process groups on one machine, so the clock is the same for all of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from resilience_util import REPO, start, trace_steps, train_args, worker_pids

from torchtitan_runai.goodput.ledger import read_records
from torchtitan_runai.goodput.report import first_step_share, summarize, typical_step_s, work_at

pytestmark = pytest.mark.slow

STEPS, INTERVAL, GAP = 24, 8, 2.0
ARGS = [
    "--checkpoint.async_mode",
    "async_with_pinned_mem",
    "--goodput.log_freq",
    "4",
    "--goodput.heartbeat_seconds",
    "0.5",
    "--debug.seed",
    "7",
]


def wait_for(tmp, step: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reached = max((r["step"] for r in trace_steps(tmp)), default=0)
        if reached >= step:
            return reached
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited {proc.returncode} before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("goodput")
    args = train_args(tmp, STEPS, INTERVAL, *ARGS)
    began = time.time()

    first = start(tmp, args, "pod1.txt")
    wait_for(tmp, 11, first)
    first.send_signal(signal.SIGTERM)  # mid-interval: the preemption save keeps every step
    assert first.wait(120) == 143, (tmp / "pod1.txt").read_text()[-3000:]
    time.sleep(GAP)

    second = start(tmp, args, "pod2.txt")
    killed_at = wait_for(tmp, 16 + 5, second)
    time.sleep(0.6)  # past one ledger heartbeat, so the killed pod's record shows these steps
    workers = worker_pids(second.pid)
    os.killpg(second.pid, signal.SIGKILL)
    for pid in workers.values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    second.wait(30)
    time.sleep(GAP)

    third = start(tmp, args, "pod3.txt")
    assert third.wait(240) == 0, (tmp / "pod3.txt").read_text()[-3000:]
    ended = time.time()
    logs = [(tmp / f"pod{i}.txt").read_text() for i in (1, 2, 3)]
    records = read_records(tmp / "out/checkpoint/goodput")
    return {
        "tmp": tmp,
        "wall": ended - began,
        "logs": logs,
        "records": records,
        "killed_at": killed_at,
        "summary": summarize(records),
    }


def segments(job):
    return [r for r in job["records"] if r["kind"] == "segment"]


def test_the_ledger_accounts_for_the_wall_clock_within_2_percent(job):
    s = job["summary"]
    assert s["accounted_s"] == pytest.approx(s["span_s"], abs=1e-6)  # every second in one category
    assert abs(s["span_s"] - job["wall"]) <= 0.02 * job["wall"], (s["span_s"], job["wall"])
    assert [r["kind"] for r in job["records"]].count("launch") == 3
    outcomes = [r["outcome"] for r in segments(job)]
    assert outcomes == ["preempted", None, "finished"]  # the killed pod never said goodbye


def test_the_preemption_keeps_its_steps_and_the_kill_redoes_what_followed_the_checkpoint(job):
    first, second, third = segments(job)
    assert first["durable_step"] == first["last_step"] and second["resume_step"] == first["last_step"]
    assert third["resume_step"] == 16  # the newest complete checkpoint before the kill
    assert second["last_step"] >= 20
    sec = job["summary"]["seconds"]
    assert sec["preemption_save"] > 0 and sec["unsaved"] == 0
    share = first_step_share(second)
    # steps 17.. up to the kill, and the step in progress then (work after the last boundary); the
    # preempted pod's last milliseconds (the boundary's signal vote) are lost work too
    lost = share + second["seconds"]["work"] - work_at(second, 16, share)
    lost += first["seconds"]["work"] - first["work_s"]
    assert sec["redone"] == pytest.approx(lost) and sec["redone"] >= 3 * typical_step_s(second)
    assert sec["checkpoint_stall"] > 0 and sec["startup"] > 0 and sec["compile"] > 0
    assert sec["productive"] > 0.2 * job["summary"]["held_s"]


def test_the_gaps_between_pods_are_away(job):
    away = job["summary"]["seconds"]["away"]
    # two gaps of GAP seconds, plus up to one heartbeat (0.5 s) of the killed pod and process spawns
    assert 2 * GAP - 0.2 <= away <= 2 * GAP + 1.5, away


def test_goodput_lines_json_tensorboard_and_the_command(job, tmp_path):
    pod1, _, pod3 = job["logs"]
    whole = "[launch] goodput of the whole job (every launch, start-up to exit): "
    assert whole in pod1 and whole in pod3
    final = [line for line in pod3.splitlines() if line.startswith(whole)][-1]
    assert "2 restart(s)" in final and "redone steps" in final and "preemption saves" in final
    # every 4 steps, rank 0, during the run (its figure at the last step is a debug line: the
    # launcher's whole-job figure is the one at the end)
    so_far = [line for line in pod3.splitlines() if "INFO - goodput so far (step " in line]
    assert so_far and all(pod3.index(line) < pod3.index(final) for line in so_far)
    summary = json.loads((job["tmp"] / "out/goodput.json").read_text())
    assert len(summary["segments"]) == 3 and summary["seconds"]["redone"] > 0

    from torchtitan_runai.plots import read_scalars

    scalars = read_scalars(job["tmp"] / "out/tb")
    assert any(k.endswith("goodput/goodput(%)") for k in scalars), sorted(scalars)[:20]

    png = tmp_path / "g.png"
    proc = subprocess.run(
        [sys.executable, "-m", "torchtitan_runai.goodput", str(job["tmp"] / "out"), "-o", str(png)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "redone steps" in proc.stdout and "ended: preempted" in proc.stdout and "ended: finished" in proc.stdout
    assert png.stat().st_size > 10_000
