"""training.log_filter: a person's log (issue 16), what LOG_LEVEL shows."""

from __future__ import annotations

import io
import logging

import pytest

from torchtitan_runai.training import log_filter


def _shown(person: log_filter.PersonFilter, *messages: str, level=logging.INFO) -> list[tuple[str, str]]:
    out = []
    for message in messages:
        record = logging.LogRecord("root", level, __file__, 1, message, None, None)
        if person.filter(record):
            out.append((record.levelname, record.getMessage()))
    return out


def test_person_filter_keeps_what_a_reader_needs():
    person = log_filter.PersonFilter(logging.INFO, cpu=True)
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
        # printed before an async save is on disk, never for the final save: the manager's line at
        # the marker replaces it (tests/unit/training/checkpoint/test_manager.py)
        "Finished saving the checkpoint (or staging if async is enabled)in 0.361 seconds.",
    ]
    assert _shown(person, *noise) == []
    kept = [
        "Starting job: rehearsal",
        "step:  1  loss:  8.1",
        "resuming from step 10 (out/step-10)",
        "Model llama3_runai debugmodel size: 6,163,712 total parameters",
    ]
    assert _shown(person, *kept) == [("INFO", m) for m in kept]
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


@pytest.fixture
def root_console():
    """A plain StreamHandler on the root logger (torchtitan's logger is the root); levels restored."""
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    levels = {name: logging.getLogger(name).level for name in ("", *log_filter.THIRD_PARTY)}
    root.addHandler(handler)
    yield root, stream
    root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_debug_level_without_the_libraries_chatter(root_console):
    root, stream = root_console
    log_filter.install_person_filter(cpu=True, env={"LOG_LEVEL": "debug"}, log=root)
    from matplotlib import font_manager

    font_manager.findfont("DejaVu Sans", rebuild_if_missing=False)  # matplotlib's "findfont: ..." at DEBUG
    logging.getLogger("filelock").debug("Attempting to acquire lock 1 on /x.lock")
    logging.getLogger("fsspec.local").debug("open file: /x")
    logging.getLogger("httpcore.connection").debug("connect_tcp.started host='s3.amazonaws.com'")
    logging.getLogger("urllib3.connectionpool").warning("Retrying after a dropped connection")
    root.debug("Building device mesh with parallelism: pp=1")
    lines = stream.getvalue().splitlines()
    assert lines == ["Retrying after a dropped connection", "Building device mesh with parallelism: pp=1"], lines
