"""training.log_filter: a person's log (issue 16), what LOG_LEVEL shows."""

from __future__ import annotations

import logging

from torchtitan_runai.training import log_filter


def _shown(person: log_filter.PersonFilter, *messages: str, level=logging.INFO) -> list[tuple[str, str]]:
    out = []
    for message in messages:
        record = logging.LogRecord("root", level, __file__, 1, message, None, None)
        if person.filter(record):
            out.append((record.levelname, record.getMessage()))
    return out


def test_person_filter_keeps_what_a_reader_needs():
    step = {"now": 10}
    person = log_filter.PersonFilter(logging.INFO, cpu=True, step=lambda: step["now"])
    noise = [
        "torch.distributed is already initialized. Skipping init_distributed.",
        "Building device mesh with parallelism: pp=1",
        "[GC] Initial GC collection took 0.00 seconds",
        'Building llama3_runai debugmodelwith {\n  "dim": 256\n}',
        "Peak flops undefined for: cpu, fallback to A100",
        "Error running lspci: [Errno 2]",
        "Trainer is initialized with local batch size 4",
        "seed: 123",
        "Saving a full checkpoint at last step, step 30.",
        "Training completed",
        "Destroying the purge thread.",
        "no complete checkpoint in ./out/checkpoint: starting fresh",
    ]
    assert _shown(person, *noise) == []
    kept = [
        "Starting job: rehearsal",
        "step:  1  loss:  8.1",
        "resuming from step 10 (out/step-10)",
        "Model llama3_runai debugmodel size: 6,163,712 total parameters",
    ]
    assert _shown(person, *kept) == [("INFO", m) for m in kept]
    assert _shown(person, "Finished saving the checkpoint (or staging if async is enabled)in 0.361 seconds.") == [
        ("INFO", "checkpoint at step 10 saved in 0.36 s")
    ]
    gpu = log_filter.PersonFilter(logging.INFO, cpu=False)
    twice = ["Peak flops undefined for: NVIDIA B300, fallback to A100"] * 2  # looked up twice by torchtitan
    assert _shown(gpu, *twice, level=logging.WARNING) == [("WARNING", twice[0])]


def test_person_filter_at_debug_shows_everything_with_fixed_labels():
    person = log_filter.PersonFilter(logging.DEBUG, cpu=True, stopping=lambda: True)
    shown = _shown(
        person,
        "Building device mesh with parallelism: pp=1",
        "Building llama3_runai debugmodelwith {}",
        "Saving a full checkpoint at last step, step 16.",
    )
    assert shown == [
        ("DEBUG", "Building device mesh with parallelism: pp=1"),
        ("DEBUG", "Building llama3_runai debugmodel with {}"),
        ("DEBUG", "Saving a full checkpoint at the stop, step 16."),
    ]  # a Ctrl-C is not the last step


def test_log_level_from_the_environment():
    assert log_filter.log_level({"LOG_LEVEL": "debug"}) == logging.DEBUG
    assert log_filter.log_level({}) == logging.INFO
