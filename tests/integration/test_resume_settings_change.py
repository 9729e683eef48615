"""A config change on resume is named, real launcher and workers (issue 24, items 3 and 5).

A run of the debug model saves at step 6 with a drawn seed; the same folder is run again with more
steps, a new learning rate and a new local batch: the launcher names each change and its fate once
(not from every rank), the new learning rate is the one the optimizer uses from step 7, the global
batch is kept, and the drawn seed is reused. Another ``seq_len`` is one line, exit 2, before any
worker starts.
"""

from __future__ import annotations

import json
import re

from resilience_util import run, train_args

FLAT = ["--lr_scheduler.warmup_steps", "2", "--lr_scheduler.min_lr_factor", "1.0"]  # lr = peak after warmup


def test_a_changed_config_on_resume_is_named_and_a_new_seq_len_refused(tmp_path):
    trace = tmp_path / "data.jsonl"
    code, first = run(tmp_path, train_args(tmp_path, 6, 6, *FLAT), log_name="first.log", LOG_RANK="0")
    assert code == 0, first[-3000:]
    seed = re.search(r"seed: (\d+)  deterministic=", first).group(1)

    more = ["--optimizer.lr", "4e-4", "--training.local_batch_size", "2"]
    code, log = run(
        tmp_path,
        train_args(tmp_path, 10, 6, *FLAT, *more),
        log_name="resume.log",
        LOG_RANK="all",
        TORCHTITAN_RUNAI_DATA_TRACE=str(trace),
    )
    assert code == 0, log[-3000:]
    named = [
        "[launch] resume from step 6 with changed schedule settings, applied from step 7: training.steps 6 -> 10",
        "[launch] optimizer.lr 0.0008 -> 0.0004: applied from step 7",
        "[launch] training.local_batch_size 4 -> 2: applied from step 7, as local batch 2 × accumulation 2; "
        "the global batch of 8 sequences is kept from the checkpoint",
        f"[launch] debug.seed: the checkpoint's seed {seed} is reused",
    ]
    for line in named:
        assert log.count(line) == 1, (line, log[-4000:])  # the launcher's, once; no rank repeats it
    assert f"seed: {seed}  deterministic=" in log
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    lrs = {r["step"]: float.fromhex(r["lr"]) for r in records if "lr" in r}
    assert sorted(lrs) == [7, 8, 9, 10] and set(lrs.values()) == {4e-4}  # torch alone kept the checkpoint's 8e-4

    code, refused = run(tmp_path, train_args(tmp_path, 12, 6, "--training.seq_len", "64"), log_name="seq.log")
    assert code == 2, refused[-3000:]
    lines = [line for line in refused.splitlines() if "training.seq_len" in line]
    assert len(lines) == 1 and "Traceback" not in refused and "[rank" not in refused
    assert "was written with training.seq_len = 128" in lines[0] and "--training.seq_len 128" in lines[0]
    assert "--checkpoint.initial_load_model_only" in lines[0]
