"""What the rehearsal prints when it is stopped and resumed (issue 16), real launcher and signals.

The fresh `make train` log itself is checked by test_readme_examples (it runs the README's
`make train` in a fresh copy). Here: a Ctrl-C is called a stop, not "the last step"; LOG_LEVEL=debug
still shows everything; a resume with a changed schedule warns once, without "WARNING - WARNING".
"""

from __future__ import annotations

import os
import re
import signal

from resilience_util import run, start, train_args, wait_for_step


def test_stop_resume_and_debug_level(tmp_path):
    p = start(tmp_path, train_args(tmp_path, 30, 10), "stop.log", LOG_LEVEL="debug", LOG_RANK="0")
    wait_for_step(tmp_path, 3, p)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's process group
    assert p.wait(90) == 130
    log = (tmp_path / "stop.log").read_text()
    stopped = int(re.search(r"stopping at step (\d+) \(signal 2\): .*saving a full checkpoint", log).group(1))
    assert "at last step" not in log  # main: "Saving a full checkpoint at last step, step 16"
    assert f"Saving a full checkpoint at the stop, step {stopped}" in log  # the label, kept at debug
    # LOG_LEVEL=debug keeps what the default level leaves out: torchtitan's set-up lines, the warnings
    assert "Building device mesh" in log and "Training starts at step 1" in log and "UserWarning" in log
    assert "Building llama3_runai debugmodel with {" in log

    code, log = run(tmp_path, train_args(tmp_path, 8, 10), log_name="resume.log", LOG_RANK="0")
    assert code == 0, log[-3000:]
    assert log.count(f"resuming from step {stopped} (") == 1
    assert log.count("resume from step") == 1 and "changed schedule settings" in log
    assert "WARNING - WARNING" not in log and "Building device mesh" not in log
    assert log.strip().splitlines()[-1].startswith("[launch] training finished: step 8 of 8")
