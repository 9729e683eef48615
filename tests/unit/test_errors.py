"""torchtitan_runai.errors: a UserError's one line, the exit codes every command gets from ``cli``, and
``flush_and_exit``, the one way the launcher and the ranks leave."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO

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
        "training.steps",
        0,
        "must be positive",
        "set training.steps to the number of steps",
    )


def test_the_value_is_shown_as_python_writes_it_and_left_out_when_none():
    assert (
        UserError("NGPU", "two", "must be an integer", "set NGPU").line()
        == "NGPU = 'two': must be an integer. Fix: set NGPU"
    )
    assert UserError("PET_NNODES", None, "is not set", "set it").line() == "PET_NNODES: is not set. Fix: set it"
    assert (
        UserError("hub.allow_download", False, "is off", "turn it on").line().startswith("hub.allow_download = False: ")
    )


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


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_the_output_is_flushed_and_the_code_kept():
    proc = _run("""
        import logging, sys
        from torchtitan_runai.errors import flush_and_exit
        logging.basicConfig(stream=sys.stderr)
        logging.getLogger("x").warning("logged")
        sys.stdout.write("printed, not flushed")
        flush_and_exit(7)
    """)
    assert proc.returncode == 7 and proc.stdout == "printed, not flushed" and "logged" in proc.stderr


def test_from_another_thread_the_exit_comes_even_when_the_main_thread_holds_a_lock():
    # the hang watchdog's case: the hung main thread holds a log handler's lock for ever
    began = time.monotonic()
    proc = _run("""
        import logging, sys, threading, time
        from torchtitan_runai import errors
        errors.FLUSH_WAIT_S = 0.5
        handler = logging.StreamHandler(sys.stderr)
        logging.getLogger().addHandler(handler)
        handler.acquire()
        threading.Thread(target=errors.flush_and_exit, args=(142,)).start()
        time.sleep(60)
    """)
    assert proc.returncode == 142 and time.monotonic() - began < 30
