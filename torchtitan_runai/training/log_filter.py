"""A person's log: the lines a reader needs at INFO, everything at ``LOG_LEVEL=debug``.

``PersonFilter`` (on torchtitan's console handler, ``install_person_filter``) moves the set-up
lines a reader does not need (``QUIET``: device mesh, model-args JSON, GC timings, "Trainer is
initialized ...", the per-save chatter, torchtitan's "Finished saving" line, which the final save
never prints and an async save prints before anything is on disk: the checkpoint manager's
``checkpoint at step N saved in S s: FOLDER`` replaces it, once a checkpoint is complete) to DEBUG,
shows a repeated lookup warning once; ``quiet_expected_noise`` silences
the Python warnings this path always raises (``EXPECTED_WARNINGS``) and the datasets progress
bars. ``LOG_LEVEL=debug`` keeps all of it, except the libraries' own chatter: torchtitan's logger is
the root logger, so at DEBUG every library's debug records would reach it (matplotlib alone prints
~150 ``findfont`` lines while drawing the plots at the end; filelock, fsspec and the HTTP client a
few per dataset load). ``THIRD_PARTY`` loggers show WARNING and above at every level.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Mapping

from torchtitan_runai import upstream

# --------------------------------------------------------------------------------------------
# a person's log: expected noise at DEBUG, LOG_LEVEL=debug shows it all

EXPECTED_WARNINGS = (
    # torch/torchtitan on a CPU device mesh (the rehearsal); harmless, printed by every rank
    r"DTensor random operators may not have complete support on cpu device mesh",
    r"DTensor manual_seed\(\) may not have complete support on cpu device mesh",
    r"Set timeout is now only supported for either nccl or gloo",
    r"In cpu autocast, but the target dtype is not supported",
    # torchdata's StatefulDataLoader calls a deprecated torch API on every construction
    r"'set_vital' is deprecated",
)
"""Python warnings that this path always raises (message prefixes, regex)."""

QUIET = (
    # setup steps the startup summary or a later line already states
    r"torch\.distributed is already initialized",  # we create the gloo group (gloo.init_gloo)
    r"Building device mesh with parallelism",
    r"Successfully created meshes",
    r"\[GC\] ",
    r"Loading tokenizer from",
    r"Applied .* to the model",
    r"Compiling (each|the)",
    r"model\.safetensors\.index\.json not found at hf_assets_path",
    r"Checkpointing active\.",
    r"TensorBoard logging enabled",
    r"Mixed precision training is handled by",
    r"Trainer is initialized with",
    r"Training starts at step",
    r"Synchronizing and adjusting timeout",
    r"Loading the checkpoint from",
    r"Saving the checkpoint \(or staging",
    r"Finished saving the checkpoint",  # the manager's line at the marker says it (step, time, folder)
    r"Saving a full checkpoint at last step",
    r"Sleeping \d+ seconds for",
    r"Training completed",
    r"Destroying the purge thread",
    r"seed: \d+$",
    r"Error running lspci",
    r"no complete checkpoint in \S+: starting fresh$",  # the startup summary says it
    r"Pipeline Parallel loss is not visible",  # it is: every stage logs the last one's (loss.last_stage_loss)
)
"""torchtitan's (and our) INFO/WARNING lines shown only at LOG_LEVEL=debug."""

QUIET_ON_CPU = (r"Peak flops undefined for: cpu", r"Peak FLOPS used for computing MFU", r"CPU memory usage for model")
"""Meaningless without a GPU: the step line leaves out memory, tflops and MFU there."""

THIRD_PARTY = (
    "matplotlib",
    "PIL",
    "urllib3",
    "httpx",
    "httpcore",
    "httpx2",
    "httpcore2",
    "fsspec",
    "filelock",
    "asyncio",
    "huggingface_hub",
    "datasets",
    "h5py",
    "numexpr",
)
"""Libraries whose loggers show only WARNING and above, ``LOG_LEVEL=debug`` included (their debug
lines are about fonts, file locks and sockets, not about the job)."""


def third_party(name: str) -> bool:
    return name.split(".", 1)[0] in THIRD_PARTY


def quiet_third_party() -> None:
    """The ``THIRD_PARTY`` loggers at WARNING: their debug records are not even made (the filter
    drops any that a library's own ``setLevel`` lets through later)."""
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.WARNING)


ONCE = (r"Peak flops undefined for",)
"""Shown the first time only (torchtitan looks the peak up twice)."""


def log_level(env: Mapping[str, str] = os.environ) -> int:
    return logging.DEBUG if env.get("LOG_LEVEL", "").strip().lower() == "debug" else logging.INFO


class PersonFilter(logging.Filter):
    """Demotes the QUIET lines to DEBUG (dropped unless LOG_LEVEL=debug), keeps ONCE lines once, and
    drops the ``THIRD_PARTY`` libraries' records below WARNING at every level.

    ``stopping``: whether a stop signal is being handled (the final save is then not "the last step").
    """

    def __init__(self, level: int = logging.INFO, cpu: bool = False, stopping=lambda: False):
        super().__init__()
        self.level = level
        self.quiet = re.compile("|".join(f"(?:{p})" for p in (*QUIET, *(QUIET_ON_CPU if cpu else ()))))
        self.once = re.compile("|".join(f"(?:{p})" for p in ONCE))
        self.seen: set[str] = set()
        self.stopping = stopping

    def _set(self, record: logging.LogRecord, level: int, message: str | None = None) -> None:
        record.levelno, record.levelname = level, logging.getLevelName(level)
        if message is not None:
            record.msg, record.args = message, None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and third_party(record.name):
            return False
        message = record.getMessage()
        if message.startswith("Building ") and "with {" in message:
            head, _, body = message.partition("with {")
            self._set(record, logging.DEBUG, f"{head.rstrip()} with {{{body}")  # upstream lacks the space
        elif self.stopping() and "at last step" in message:
            self._set(record, logging.DEBUG, message.replace("at last step", "at the stop"))
        elif self.quiet.match(message):
            self._set(record, logging.DEBUG)
        elif self.once.match(message):
            if message in self.seen:
                self._set(record, logging.DEBUG)
            self.seen.add(message)
        return record.levelno >= self.level


def quiet_expected_noise(env: Mapping[str, str] = os.environ) -> None:
    """Silence, at their source, the warnings this path always raises (unless LOG_LEVEL=debug)."""
    if log_level(env) == logging.DEBUG:
        return
    import warnings

    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # the datasets library's "Generating train split" bars, on every rank, for a local dataset
    try:
        import datasets
    except ImportError:
        return
    datasets.disable_progress_bars()


def install_person_filter(
    *,
    cpu: bool,
    stopping=lambda: False,
    env: Mapping[str, str] = os.environ,
    log: logging.Logger | None = None,
) -> PersonFilter:
    """Put a PersonFilter on torchtitan's console handler(s) and the logger's level to LOG_LEVEL;
    the libraries' loggers at WARNING (``quiet_third_party``)."""
    log = upstream.logger if log is None else log
    level = log_level(env)
    quiet_third_party()
    person = PersonFilter(level, cpu=cpu, stopping=stopping)
    log.setLevel(min(level, log.level or level))
    for handler in log.handlers:
        handler.filters = [f for f in handler.filters if not isinstance(f, PersonFilter)]
        handler.addFilter(person)
        if level == logging.DEBUG:
            handler.setLevel(logging.DEBUG)
    return person
