"""torchtitan_runai.errors.flush_and_exit: the one way the launcher and the ranks leave."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from conftest import REPO


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


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
