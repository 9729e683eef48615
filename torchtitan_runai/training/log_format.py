"""What a job prints: one readable, parseable line per event, on every rank.

``kubectl logs`` interleaves the output of every rank of a pod (and tools collect several pods), so
every line carries its origin, and colour codes are only emitted to a terminal::

    [titan] 2026-01-01 12:00:00,000 - node0/rank3 - INFO - step: 10  loss:  7.81234  ...

``configure_logging(rank, node_rank)`` (``configure_logging_from_env()`` under torchrun, which
sets RANK and GROUP_RANK) re-formats torchtitan's logger: its ``[titan] time - ... - LEVEL -``
layout with ``node/rank`` where torchtitan prints the logger name (always ``root``), and ANSI
escapes stripped unless the stream is a terminal (``NO_COLOR`` set: never; ``FORCE_COLOR``
set: always).

NCCL's own logging is left alone: NCCL_DEBUG is passed through when the user sets it and never
forced (INFO prints several lines per communicator per rank).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Mapping, TextIO

from torchtitan_runai import upstream

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LINE_FORMAT = "[titan] %(asctime)s - {origin} - %(levelname)s - %(message)s"


def strip_ansi(text: str) -> str:
    return ANSI_ESCAPE.sub("", text)


def wants_color(stream: TextIO | None = None, env: Mapping[str, str] = os.environ) -> bool:
    """Colour only for a terminal; NO_COLOR (https://no-color.org) and FORCE_COLOR override."""
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR"):
        return True
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def origin(rank: int, node_rank: int | None = None) -> str:
    return f"rank{rank}" if node_rank is None else f"node{node_rank}/rank{rank}"


class RankFormatter(logging.Formatter):
    """torchtitan's line layout with the node/rank; ANSI escapes removed when ``color`` is off."""

    def __init__(self, rank: int, node_rank: int | None = None, color: bool = False):
        super().__init__(LINE_FORMAT.format(origin=origin(rank, node_rank)))
        self.color = color

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if self.color else strip_ansi(line)


def configure_logging(
    rank: int,
    node_rank: int | None = None,
    *,
    stream: TextIO | None = None,
    color: bool | None = None,
    log: logging.Logger | None = None,
) -> bool:
    """Give torchtitan's logger (set up by ``init_logger``) our per-rank, colour-aware format.

    Call after ``upstream.init_logger()`` (torchtitan's ``main`` calls it first; calling it again
    would undo this). Returns whether colour is on, for ``metrics.disable_color_printing``.
    """
    log = upstream.logger if log is None else log
    if not log.handlers:
        upstream.init_logger()
    # torchtitan's console handler is a plain StreamHandler; subclasses (file or test-capture
    # handlers that others attached) keep their own format.
    consoles = [h for h in log.handlers if type(h) is logging.StreamHandler]
    for handler in consoles:
        if stream is not None:
            handler.setStream(stream)
    target = stream or (consoles[0].stream if consoles else sys.stdout)
    color = wants_color(target) if color is None else color
    for handler in consoles:
        handler.setFormatter(RankFormatter(rank, node_rank, color))
    return color


def configure_logging_from_env(env: Mapping[str, str] = os.environ, **kwargs: Any) -> bool:
    """``configure_logging`` with torchrun's RANK and GROUP_RANK (node rank)."""
    node = env.get("GROUP_RANK", env.get("NODE_RANK"))
    return configure_logging(int(env.get("RANK", "0")), int(node) if node else None, **kwargs)
