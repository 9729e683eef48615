"""training.log_format: node/rank on every line, no ANSI off a terminal, colour kept for a terminal."""

from __future__ import annotations

import io
import logging
import re

import pytest

from torchtitan_runai import upstream
from torchtitan_runai.training import log_format


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def console():
    """A plain StreamHandler on torchtitan's (root) logger, like init_logger's; removed after."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = upstream.logger
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream, handler
    root.removeHandler(handler)
    root.setLevel(level)


def test_lines_carry_node_and_rank_and_no_ansi_off_a_terminal(console):
    stream, _ = console
    assert log_format.configure_logging(rank=3, node_rank=1) is False  # StringIO is not a TTY
    upstream.logger.info(f"{upstream.Color.red}hello{upstream.Color.reset}")
    line = stream.getvalue()
    assert re.match(r"\[titan\] \S+ \S+ - node1/rank3 - INFO - hello\n$", line), line
    assert "\x1b" not in line


def test_colour_kept_for_a_terminal_unless_no_color(console, monkeypatch):
    stream, handler = console
    tty = Tty()
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    assert log_format.configure_logging(rank=0, stream=tty) is True
    upstream.logger.info(f"{upstream.Color.red}hello{upstream.Color.reset}")
    assert "\x1b[31mhello" in tty.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    assert log_format.wants_color(tty) is False


def test_configure_from_torchrun_env(console):
    stream, _ = console
    log_format.configure_logging_from_env({"RANK": "9", "GROUP_RANK": "1", "LOCAL_RANK": "1"})
    upstream.logger.info("x")
    assert " - node1/rank9 - INFO - x" in stream.getvalue()
