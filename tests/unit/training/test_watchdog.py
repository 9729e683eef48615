"""Watchdog semantics that the long saves of 70B/405B depend on."""

import time

from torchtitan_runai.training.watchdog import Watchdog


def test_no_hang_verdict_while_a_save_runs():
    dog = Watchdog(timeout_s=0.05)
    dog.progress(step=3, arm=True)
    dog.progress_at -= 10  # as if the last step ended long ago
    with dog.paused():
        assert not dog.armed  # _run checks `armed` before comparing against the timeout
    assert dog.armed and time.monotonic() - dog.progress_at < 1  # the save counts as progress


def test_pause_keeps_an_unarmed_watchdog_unarmed():
    dog = Watchdog(timeout_s=0.05)
    with dog.paused():
        pass
    assert not dog.armed
