"""Two runs on one checkpoint folder (issue 16): real launchers, no JOB_UUID/JOB_NAME (a plain
``docker run`` or two ``make train``). main let both train and write the same step-N folders.

- started together: exactly one trains, the other exits 2 naming the folder and the fix;
- started while the first trains: refused the same way;
- after the first is killed with SIGKILL (no clean exit, its lock left behind): a new run takes
  the folder over and resumes.
"""

from __future__ import annotations

import os
import signal

from resilience_util import run, start, train_args, wait_for_step

REFUSED = "another run is training in this folder now"


def test_runs_started_together_exactly_one_trains(tmp_path):
    args = train_args(tmp_path, 2, 2, "--lr_scheduler.warmup_steps", "2")
    procs = [start(tmp_path, args, f"run{i}.log") for i in (0, 1)]
    codes = [p.wait(timeout=300) for p in procs]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in (0, 1)]
    assert sorted(codes) == [0, 2], logs
    loser = logs[codes.index(2)]
    assert REFUSED in loser and str(tmp_path / "out" / "checkpoint") in loser and "Fix:" in loser
    assert "[rank" not in loser and "Traceback" not in loser
    assert "training finished: step 2 of 2" in logs[codes.index(0)]


def test_a_live_run_keeps_the_folder_and_a_killed_one_gives_it_up(tmp_path):
    first = start(tmp_path, train_args(tmp_path, 30, 2), "first.log")
    try:
        wait_for_step(tmp_path, 3, first)  # training, with step-2 on disk
        code, log = run(tmp_path, train_args(tmp_path, 30, 2), timeout=120, log_name="second.log")
        assert code == 2 and REFUSED in log and f"pid {first.pid}" in log, log[-3000:]
        assert "[rank" not in log
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the launcher and its workers, no cleanup at all
        first.wait()
    assert (tmp_path / "out" / "checkpoint" / "lock.json").exists()  # left behind by the killed run
    code, log = run(tmp_path, train_args(tmp_path, 30, 2), log_name="third.log")
    assert code == 0, log[-3000:]
    assert "resuming from step" in log and "training finished: step 30 of 30" in log
    assert not (tmp_path / "out" / "checkpoint" / "lock.json").exists()  # released at the end
