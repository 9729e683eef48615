"""The hang watchdog: a thread per rank that finds a hung job, names the rank, and ends it.

Each rank publishes a heartbeat (time, step, pid, host) to the rendezvous store every few seconds.
When this rank's training has not advanced for ``resilience.hang_timeout_seconds``, it finds the
rank(s) whose heartbeat stopped (a frozen or stopped process) or that are behind, logs one line
naming them, SIGKILLs frozen ranks on its own host (torchrun would otherwise wait its shutdown grace
for a stopped process), writes torchrun's error file and the launcher's hang verdict
(``errors.HANG_VERDICT_ENV``) and exits ``errors.EXIT_HUNG``; the launcher turns that into a
restartable exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

from torchtitan_runai.errors import EXIT_HUNG, HANG_VERDICT_ENV, flush_and_exit, leave_for_launcher


def _error_file(message: str) -> None:
    """torchrun shows a worker's error file in its failure summary (and our launcher prints it)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass


class Watchdog:
    def __init__(self, timeout_s: float, beat_s: float = 2.0):
        self.timeout_s = float(timeout_s)
        self.beat_s = float(beat_s)
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.step = 0
        self.armed = False
        self.progress_at = time.monotonic()
        self._stop = threading.Event()
        self._store = None
        self._thread = None
        self.on_hang = None  # called with the monotonic time of the last progress, before the exit

    # main thread ------------------------------------------------------------------------
    def progress(self, step: int | None = None, arm: bool = False) -> None:
        if step is not None:
            self.step = step
        self.progress_at = time.monotonic()
        if arm:
            self.armed = True

    @contextlib.contextmanager
    def paused(self):
        """No hang verdict while inside (a checkpoint save or upload wait can outlast the timeout)."""
        armed, self.armed = self.armed, False
        try:
            yield
        finally:
            self.progress_at = time.monotonic()
            self.armed = armed

    def start(self) -> None:
        if self.timeout_s <= 0 or self.world <= 1 or "MASTER_ADDR" not in os.environ:
            return
        import torch.distributed as dist

        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        base = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=30),
            wait_for_workers=False,
        )
        self._store = dist.PrefixStore(f"runai/heartbeat/{restart}", base)
        self._thread = threading.Thread(target=self._run, name="runai-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # watchdog thread -----------------------------------------------------------------------
    def _beat(self) -> None:
        self._store.set(
            f"hb/{self.rank}",
            json.dumps({"t": time.time(), "step": self.step, "pid": os.getpid(), "host": socket.gethostname()}),
        )

    def _peers(self) -> dict[int, dict]:
        keys = [f"hb/{r}" for r in range(self.world)]
        out = {}
        for r, k in enumerate(keys):
            try:
                if self._store.check([k]):
                    out[r] = json.loads(self._store.get(k))
            except Exception:
                pass
        return out

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.beat_s):
                self._beat()
                if self.armed and time.monotonic() - self.progress_at > self.timeout_s:
                    self._hung()
        except Exception as e:  # the store went away: the job is ending anyway
            if not self._stop.is_set():
                print(f"[resilience] rank {self.rank}: watchdog stopped ({e})", file=sys.stderr, flush=True)

    def _hung(self) -> None:
        stalled = time.monotonic() - self.progress_at
        first = self._peers()
        time.sleep(2 * self.beat_s + 0.5)
        second = self._peers()
        frozen = sorted(
            r
            for r in range(self.world)
            if r != self.rank and (r not in second or second[r].get("t") == first.get(r, {}).get("t"))
        )
        behind = []
        if not frozen and second:
            low = min(v.get("step", 0) for v in second.values())
            if any(v.get("step", 0) != low for v in second.values()):
                behind = sorted(r for r, v in second.items() if v.get("step", 0) == low)
        if frozen:
            who = "hung rank(s) " + ", ".join(
                f"{r} (pid {second.get(r, first.get(r, {})).get('pid', '?')} on "
                f"{second.get(r, first.get(r, {})).get('host', '?')}, heartbeat stopped)"
                for r in frozen
            )
        elif behind:
            who = "hung rank(s) " + ", ".join(str(r) for r in behind) + " (behind the others)"
        else:
            who = "every rank is waiting: a collective or I/O never completed"
        line = (
            f"hang detected by rank {self.rank}: no training progress for {stalled:.0f}s "
            f"(resilience.hang_timeout_seconds = {self.timeout_s:.0f}, last step {self.step}); {who}; "
            f"exiting {EXIT_HUNG} so the job restarts"
        )
        print(f"[resilience] {line}", file=sys.stderr, flush=True)
        _error_file(line)
        write_hang_verdict(line)
        here = socket.gethostname()
        for r in frozen:
            info = second.get(r) or first.get(r) or {}
            if info.get("host") == here and info.get("pid"):
                try:
                    os.kill(int(info["pid"]), signal.SIGKILL)
                except OSError:
                    pass
        if self.on_hang is not None:
            try:
                self.on_hang(self.progress_at)
            except Exception:  # the verdict and the exit matter more than the accounting
                pass
        flush_and_exit(EXIT_HUNG)


def write_hang_verdict(line: str) -> None:
    # without it, the launcher reports the failures torchrun saw
    leave_for_launcher(HANG_VERDICT_ENV, line)
