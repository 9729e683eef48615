"""What the rehearsal prints when it is stopped and resumed (issues 16, 24), real launcher and signals.

The fresh `make train` log itself is checked by test_readme_examples (it runs the README's
`make train` in a fresh copy). Here: a Ctrl-C is called a stop, not "the last step"; LOG_LEVEL=debug
still shows everything but the libraries' chatter; a resume with a changed schedule warns once,
without "WARNING - WARNING"; every checkpoint has its line, the final one included; one goodput
figure, named; a last line that says what to do next; and, with the data and tokenizer on disk, no
process of the run tries to reach another host (``netwatch/sitecustomize.py`` records every lookup and
connect of every Python process of the launch, workers included).
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

from resilience_util import run, start, train_args, wait_for_step

NETWATCH = Path(__file__).resolve().parent / "netwatch"
# the libraries' debug lines (matplotlib drawing the curves, datasets' file locks and files, the HTTP client)
THIRD_PARTY_NOISE = ("findfont", "Attempting to acquire lock", "open file:", "connect_tcp", "matplotlib data path")


def watched(tmp_path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(NETWATCH), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "NETWATCH_FILE": str(tmp_path / "network.jsonl")}


def attempts(tmp_path) -> list[dict]:
    path = tmp_path / "network.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_stop_resume_and_debug_level(tmp_path):
    p = start(tmp_path, train_args(tmp_path, 30, 10), "stop.log", LOG_LEVEL="debug", LOG_RANK="0", **watched(tmp_path))
    wait_for_step(tmp_path, 3, p)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's process group
    assert p.wait(90) == 130
    log = (tmp_path / "stop.log").read_text()
    stopped = int(re.search(r"stopping at step (\d+) \(signal 2\): .*saving a full checkpoint", log).group(1))
    assert "at last step" not in log  # main: "Saving a full checkpoint at last step, step 16"
    assert f"Saving a full checkpoint at the stop, step {stopped}" in log  # the label, kept at debug
    assert re.search(rf"INFO - checkpoint at step {stopped} saved in \d+\.\d\d s: \S+/step-{stopped}\n", log)
    # LOG_LEVEL=debug keeps what the default level leaves out: torchtitan's set-up lines, the warnings
    assert "Building device mesh" in log and "Training starts at step 1" in log and "UserWarning" in log
    assert "Building llama3_runai debugmodel with {" in log

    code, log = run(
        tmp_path,
        train_args(tmp_path, 8, 10),
        log_name="resume.log",
        LOG_RANK="0",
        LOG_LEVEL="debug",
        **watched(tmp_path),
    )
    assert code == 0, log[-3000:]
    assert log.count(f"resuming from step {stopped} (") == 1
    assert log.count("resume from step") == 1 and "changed schedule settings" in log
    assert "WARNING - WARNING" not in log
    # debug without the libraries' chatter (~150 findfont lines while the curves are drawn at the end)
    assert "Training curves written to" in log and not [n for n in THIRD_PARTY_NOISE if n in log]
    # the final step's checkpoint has its line (torchtitan prints none for it), once
    assert len(re.findall(r"INFO - checkpoint at step 8 saved in \d+\.\d\d s: \S+/checkpoint/step-8\n", log)) == 1
    # CPU step lines: nothing that means nothing there
    steps = [line for line in log.splitlines() if re.search(r"step:\s*\d+\s+loss:", line)]
    assert steps and not [line for line in steps if re.search(r"memory:|tflops:|mfu:|n/a", line)]
    # one figure for the run, named; rank 0's are progress figures, named so (at debug: its last one too)
    figures = [line for line in log.splitlines() if re.search(r"goodput.*: \d+\.\d% of", line)]
    assert [f for f in figures if "goodput of the whole job (every launch, start-up to exit): " in f] == figures[-1:]
    assert all(re.search(r"goodput so far \(step \d+\): ", f) for f in figures[:-1])
    last = log.strip().splitlines()
    assert last[-2].startswith("[launch] training finished: step 8 of 8")
    assert re.fullmatch(
        r"\[launch\] next: export the weights for Hugging Face: python -m torchtitan_runai\.export \S+/step-8 "
        r"\S+/out/hf --config \S+debug_model\.toml; loss curves \S+/training_curves\.png; "
        r"goodput breakdown: python -m torchtitan_runai\.goodput \S+/out",
        last[-1],
    ), last[-1]
    # the data and the tokenizer are files: no process of either launch looked up or reached another host
    assert attempts(tmp_path) == [], attempts(tmp_path)[:2]
