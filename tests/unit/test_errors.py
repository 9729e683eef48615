"""errors: a UserError's one line, and the exit codes every command gets from ``cli``."""

from __future__ import annotations

import signal
import sys

import pytest

from torchtitan_runai import errors
from torchtitan_runai.errors import (
    EXIT_HUNG,
    EXIT_USER_ERROR,
    UserError,
    cli,
    exit_with,
)


def test_the_line_names_the_setting_its_value_why_and_the_fix():
    error = UserError("training.steps", 0, "must be positive", "set training.steps to the number of steps")
    assert error.line() == "training.steps = 0: must be positive. Fix: set training.steps to the number of steps"
    assert str(error) == error.line()
    assert (error.setting, error.value, error.why, error.fix) == (
        "training.steps", 0, "must be positive", "set training.steps to the number of steps")


def test_the_value_is_shown_as_python_writes_it_and_left_out_when_none():
    assert UserError("NGPU", "two", "must be an integer", "set NGPU").line() == \
        "NGPU = 'two': must be an integer. Fix: set NGPU"
    assert UserError("PET_NNODES", None, "is not set", "set it").line() == "PET_NNODES: is not set. Fix: set it"
    assert UserError("hub.allow_download", False, "is off", "turn it on").line().startswith(
        "hub.allow_download = False: ")


def run_cli(main, monkeypatch, argv=("prog", "--a", "b")):
    monkeypatch.setattr(sys, "argv", list(argv))
    with pytest.raises(SystemExit) as done:
        cli(main, prog="mycmd")
    return done.value.code


def test_cli_passes_the_arguments_and_exits_with_mains_code(monkeypatch, capsys):
    seen = []
    assert run_cli(lambda argv: seen.append(argv), monkeypatch) == 0  # None: success
    assert seen == [["--a", "b"]]
    assert run_cli(lambda argv: 0, monkeypatch) == 0
    assert run_cli(lambda argv: 143, monkeypatch) == 143
    assert capsys.readouterr() == ("", "")


def test_cli_turns_a_user_error_into_one_line_and_exit_2(monkeypatch, capsys):
    def main(argv):
        raise UserError("checkpoint.interval", 0, "must be positive", "save every N steps")

    assert run_cli(main, monkeypatch) == EXIT_USER_ERROR == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "mycmd: error: checkpoint.interval = 0: must be positive. Fix: save every N steps\n"


def test_cli_exits_130_on_ctrl_c(monkeypatch, capsys):
    def main(argv):
        raise KeyboardInterrupt

    assert run_cli(main, monkeypatch) == 130
    assert capsys.readouterr().err == "mycmd: interrupted\n"


def test_cli_lets_a_bug_through_as_a_traceback(monkeypatch):
    def main(argv):
        raise ValueError("a bug, not a user's mistake")

    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(ValueError, match="a bug"):
        cli(main, prog="mycmd")


def test_exit_with_prints_under_the_default_name(capsys):
    with pytest.raises(SystemExit) as done:
        exit_with(UserError("x", 1, "why", "fix"))
    assert done.value.code == 2
    assert capsys.readouterr().err == "torchtitan-runai: error: x = 1: why. Fix: fix\n"


def test_a_hung_job_exits_128_plus_sigalrm():
    # Kubeflow's ExitCode restart policy retries 128+N; the launcher and every rank's watchdog share it.
    assert EXIT_HUNG == 142 == 128 + signal.SIGALRM
    assert errors.HANG_VERDICT_ENV == "TORCHTITAN_RUNAI_HANG_VERDICT"
