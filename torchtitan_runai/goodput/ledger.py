"""The goodput ledger: rank 0's clock, split into categories, kept on the job's volume.

A job's life is a series of *launches* (one per pod start: ``python -m torchtitan_runai.launch``)
and, inside each, *segments* (one per life of the rank-0 training process; torchrun may restart
it inside a launch). Each writes its own small JSON file under the ledger folder
(``storage.goodput_dir``: ``<checkpoint folder>/goodput``), so no file has two writers and a
successor reads every predecessor's record:

- ``launch-<start>-<pid>.json``: written by the launcher of node 0 once it holds the folder and again
  when its workers have exited (``LaunchRecord``);
- ``segment-<start>-<pid>.json``: written by rank 0 every ``goodput.heartbeat_seconds`` from a
  background thread, and at once when a checkpoint is marked complete or the process ends
  (``Ledger``). A ``kill -9`` loses at most one heartbeat of accounting; that time shows as
  "away".

Inside a segment the ledger is a state machine: it is always in exactly one raw state, and
``switch`` credits the time since the last switch to the state being left, so the states add up to
the segment's duration by construction (``seconds`` sums to ``last_seen - started_at``). The raw
states: ``startup`` (from the process's own start, read from /proc, to the training loop),
``compile`` (the segment's first step, however long it takes), ``work`` (later steps),
``data_wait`` (inside the data loader), ``checkpoint_stall`` (an interval or final save, minus
``upload_wait``: waiting for the previous upload first), ``preemption_save`` (signal boundary to
marked checkpoint), ``teardown`` and ``hang`` (from the last progress to the watchdog's verdict).

Time is read on the host, with no extra device sync per step: the save path synchronizes once per
save (it would wait for the device anyway) and the first step once per segment, so the steps
before a save and the compile step are charged their device time; between those points the
host's view of a step is the device's averaged over the window. ``data_wait`` is the host's time
in the loader; when the host runs ahead of the device it overlaps device work.

What each step's work is worth is only known later: ``work`` seconds are cumulative per segment,
with the cumulative value at every save (``saves``), so that ``report.summarize`` can split them
into productive, redone (a later segment resumed from an older step) and unsaved (after the newest
complete checkpoint, nothing has resumed yet).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from torchtitan_runai.jsonio import read_json, write_json_atomic

VERSION = 1
LAUNCH_ID_ENV = "TORCHTITAN_RUNAI_LAUNCH_ID"
"""Set by the launcher for its workers: the id of the launch record their segments belong to."""
RAW_STATES = (
    "startup",
    "compile",
    "work",
    "data_wait",
    "checkpoint_stall",
    "upload_wait",
    "preemption_save",
    "teardown",
    "hang",
)
TRAINING = ("work", "compile")
"""States that a save or a data wait interrupts (a save inside the preemption save stays in it)."""
TIMELINE_LIMIT = 4000


def process_start_wall(pid: int | str = "self") -> float | None:
    """Wall-clock time at which a process started (Linux: /proc, 10 ms resolution), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counted after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def record_name(kind: str, started_at: float, pid: int) -> str:
    return f"{kind}-{int(started_at * 1000):015d}-{pid}.json"


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Every launch and segment record in the ledger folder, oldest first."""
    out = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return out
    for name in names:
        if name.endswith(".json") and name.startswith(("launch-", "segment-")):
            rec = read_json(Path(folder) / name)
            if rec and rec.get("version") == VERSION:
                rec["file"] = name
                out.append(rec)
    return sorted(out, key=lambda r: r.get("started_at", 0.0))


class LaunchRecord:
    """The launcher's part: when the pod's launcher started and when its workers were done."""

    def __init__(self, folder: Path, started_at: float | None = None):
        self.folder = Path(folder)
        self.started_at = started_at or process_start_wall() or time.time()
        self.path = self.folder / record_name("launch", self.started_at, os.getpid())
        self.id = self.path.stem
        self.data: dict[str, Any] = {
            "version": VERSION,
            "kind": "launch",
            "id": self.id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": self.started_at,
            "ended_at": None,
            "exit_code": None,
        }

    def open(self) -> "LaunchRecord":
        self._write()
        return self

    def close(self, exit_code: int) -> None:
        self.data.update(ended_at=time.time(), exit_code=exit_code)
        self._write()

    def _write(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.data)
        except OSError:  # a full volume (the launch's own exit line says so): a record, never a traceback
            pass


class Ledger:
    """Rank 0's state machine for one segment (see the module docstring). Thread-safe: the heartbeat
    thread and the hang watchdog call ``flush``/``switch`` too."""

    def __init__(
        self,
        folder: Path,
        *,
        heartbeat_s: float = 5.0,
        launch_id: str | None = None,
        started_at: float | None = None,
        clock=time.monotonic,
        wall=time.time,
    ):
        self.folder = Path(folder)
        self.heartbeat_s = heartbeat_s
        self._clock = clock
        self._lock = threading.RLock()
        self._io_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        now_wall, now = wall(), clock()
        self._wall0, self._mono0 = now_wall, now
        started_at = started_at if started_at is not None else (process_start_wall() or now_wall)
        started_at = min(started_at, now_wall)
        self.history = read_records(self.folder)  # the predecessors, read once
        pid = os.getpid()
        self.path = self.folder / record_name("segment", started_at, pid)
        self.seconds = {s: 0.0 for s in RAW_STATES}
        self.seconds["startup"] = now_wall - started_at  # the interpreter and imports before us
        self.state, self._since = "startup", now
        self._entered = now  # when the current state began (``_since`` moves on at every credit)
        self.timeline: list[list] = [[0.0, "startup"]]
        self.data: dict[str, Any] = {
            "version": VERSION,
            "kind": "segment",
            "id": self.path.stem,
            "launch": launch_id,
            "pid": pid,
            "host": socket.gethostname(),
            "started_at": started_at,
            "last_seen": now_wall,
            "outcome": None,
            "resume_step": None,
            "first_step": None,
            "first_step_s": None,
            "last_step": None,
            "work_s": 0.0,
            "saves": {},
            "durable_step": None,
        }

    # -- clock -----------------------------------------------------------------------------

    def _wall(self, t: float) -> float:
        return self._wall0 + (t - self._mono0)

    def _credit(self, now: float) -> None:
        self.seconds[self.state] += max(0.0, now - self._since)
        self._since = max(self._since, now)

    def switch(self, state: str) -> str:
        """Enter ``state`` now. Returns the state left."""
        with self._lock:
            now = self._clock()
            self._credit(now)
            previous, self.state = self.state, state
            if state != previous:
                self._entered = now
                self._note(now, state)
            return previous

    def _note(self, now: float, state: str) -> None:
        # the timeline keeps what a plot shows: training (work and data) versus everything else
        label = "work" if state == "data_wait" else state
        if self.timeline and self.timeline[-1][1] == label:
            return
        offset = self._wall(now) - self.data["started_at"]
        if len(self.timeline) >= TIMELINE_LIMIT:
            del self.timeline[1:3]  # the oldest transitions go first; totals are unaffected
        self.timeline.append([round(offset, 3), label])

    @contextlib.contextmanager
    def during(self, state: str) -> Iterator[None]:
        """Charge what runs inside to ``state`` when it interrupts training; otherwise (e.g. a save
        inside the preemption save) the time stays where it is."""
        if self.state not in TRAINING:
            yield
            return
        previous = self.switch(state)
        try:
            yield
        finally:
            self.switch(previous)

    # -- events ----------------------------------------------------------------------------

    def loop_started(self, step: int) -> None:
        """The training loop's first boundary: the checkpoint (if any) is loaded at ``step``."""
        with self._lock:
            self.data["resume_step"] = step
            self.data["last_step"] = step
            self.switch("compile")
        self._wake.set()

    def step_done(self, step: int) -> None:
        """A boundary after ``step`` finished (torchtitan's ``should_continue_training``)."""
        with self._lock:
            now = self._clock()
            self._credit(now)
            if self.data["first_step"] is None:
                self.data["first_step"] = step
                self.data["first_step_s"] = self.seconds["compile"]
                self.switch("work")
            self.data["last_step"] = step
            self.data["work_s"] = self.seconds["work"]

    def saving(self, step: int) -> None:
        """A save of ``step`` begins: the work done up to it is what resuming from it keeps."""
        with self._lock:
            self._credit(self._clock())
            if self.data["first_step"] is None:  # a save right after the first step
                self.step_done(step)
            self.data["saves"][str(step)] = self.seconds["work"]

    def marked(self, step: int) -> None:
        """The checkpoint of ``step`` is complete on the volume."""
        with self._lock:
            self.data["durable_step"] = max(step, self.data["durable_step"] or step)
        self._wake.set()  # written by the heartbeat thread now: a slow volume does not stall the step

    def hung(self, since: float) -> None:
        """The watchdog's verdict: everything since ``since`` (``time.monotonic``, the last progress)
        was a hang. What heartbeats already credited to the state the rank got stuck in moves to
        ``hang``; states left before that keep their time."""
        with self._lock:
            now = self._clock()
            self._credit(now)
            start = min(max(since, self._entered), now)
            moved = min(now - start, self.seconds[self.state])
            self.seconds[self.state] -= moved
            self.seconds["hang"] += moved
            self.state, self._entered = "hang", start
            self._note(start, "hang")
        self.end("hung")

    def end(self, outcome: str) -> None:
        with self._lock:
            self.switch("teardown" if self.state not in ("hang",) else self.state)
            self.data["outcome"] = outcome
        self.stop()
        self.flush()

    # -- persistence -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """This segment's record as of now (states credited up to now, nothing switched)."""
        with self._lock:
            now = self._clock()
            self._credit(now)
            rec = dict(
                self.data,
                seconds=dict(self.seconds),
                timeline=[list(t) for t in self.timeline],
                state=self.state,
                saves=dict(self.data["saves"]),
            )
            rec["last_seen"] = self._wall(now)
            return rec

    def flush(self) -> dict[str, Any]:
        # one writer at a time (heartbeat, main thread, watchdog), each writing a snapshot newer
        # than the one before: the file never goes back in time, and the temp file is never shared
        # (a bounded wait: a signal handler flushing over an interrupted flush must not deadlock)
        if not self._io_lock.acquire(timeout=5):
            return self.snapshot()
        try:
            rec = self.snapshot()
            write_json_atomic(self.path, rec)
        except OSError:  # a full or read-only volume must not stop training; the next beat retries
            pass
        finally:
            self._io_lock.release()
        return rec

    def start(self) -> "Ledger":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush()
        self._thread = threading.Thread(target=self._beat, name="runai-goodput", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while True:
            self._wake.wait(self.heartbeat_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.flush()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def records(self) -> list[dict[str, Any]]:
        """The predecessors and this segment, for ``report.summarize``."""
        return [*self.history, self.snapshot()]


class NullLedger:
    """What ranks other than 0 (and runs with [goodput] enable = false) hold: the same calls, no clock."""

    def switch(self, state: str) -> str:
        return state

    @contextlib.contextmanager
    def during(self, state: str) -> Iterator[None]:
        yield

    def loop_started(self, step: int) -> None: ...
    def step_done(self, step: int) -> None: ...
    def saving(self, step: int) -> None: ...
    def marked(self, step: int) -> None: ...
    def hung(self, since: float) -> None: ...
    def end(self, outcome: str) -> None: ...
    def stop(self) -> None: ...

    def records(self) -> None:
        return None
