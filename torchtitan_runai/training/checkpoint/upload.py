"""How a checkpoint reaches storage: DCP's saving process, started early and deaf to the pod's
signal, and parallel writers.

With ``checkpoint.async_mode = "async_with_pinned_mem"`` torchtitan hands each staged checkpoint to
DCP's checkpoint process (``AsyncCheckpointerType.PROCESS``), which writes it while training goes
on. Stock DCP (torch 2.10-2.13) spawns that process lazily, inside the first save, from an
executor thread: the ``spawn`` child re-imports torch (and ``train.py``) and joins a gloo group,
10-14 s on the GPU host, during which the first upload waits (and the second save waits for it).
The child also keeps SIGTERM's default action, and torchrun forwards the pod's SIGTERM to the
worker's whole process group (``os.killpg``): the saving process dies with the upload in flight,
the worker's next ``finish_async`` raises, and no preemption checkpoint is written.

``UploadProcess`` fixes both, without changing DCP:

- it builds DCP's ``_ProcessGroupInitInfo`` on the main thread at trainer start (a broadcast on the
  checkpoint's gloo group, every rank at the same point), then constructs DCP's own
  ``_AsyncCheckpointProcess`` on a background thread and installs it as DCP's module-level saving
  process, so DCP never spawns one inside a save. ``wait_ready`` (called by the first async save)
  joins that thread, normally long finished;
- the background thread blocks SIGTERM and SIGINT with ``pthread_sigmask`` before it spawns. A
  thread's signal mask is copied by fork and kept across exec, so the child starts with both
  blocked (and every thread it creates inherits that): the pod's SIGTERM and a terminal's Ctrl-C
  stay pending there and never act, while the trainer's own handlers are untouched (the kernel
  hands a process-directed signal to a thread that does not block it, the main thread). Setting
  SIG_IGN around ``Process.start()`` instead would race with the trainer: a SIGTERM landing in that
  window would be discarded. ``multiprocessing``'s resource tracker unblocks both signals in the
  calling thread the first time it starts, so it is started before the mask is set;
- the child now ends only by our ``shutdown`` (a TERMINATE request, then SIGKILL after 5 s; at the
  end of a run), our ``kill`` (after a preemption checkpoint, when it is idle: the round trip costs
  seconds of the grace period), SIGKILL (torchrun's kill window, kill -9), or its worker's death:
- it dies with its worker, however the worker dies: the first thing the child does with what it is
  sent (``DiesWithWorker``, DCP's init info with the worker's pid, unpickled in the child before
  DCP's loop starts) is to ask the kernel for SIGKILL when its parent dies
  (``lifetime.die_with_parent``; SIGKILL since it blocks SIGTERM). DCP's own end, EOF on its pipe,
  is read only between uploads: a worker killed with an upload in flight (its launcher killed with
  ``kill -9``: the worker dies with it, ``training.trainer``) left the child writing on into the
  folder beside the next run. The kernel signals when the *thread* that created the child exits,
  not the process, so the background thread that spawns it stays alive, idle, until the child is
  stopped (``shutdown``, ``kill``) or the worker is gone;
  ``multiprocessing``'s exit hook would ``terminate()`` and ``join()`` it (a hang with SIGTERM
  blocked), so every exit path of the trainer calls ``shutdown`` and leaves with ``os._exit``.

``writer(checkpoint_id, threads)`` is the ``FileSystemWriter`` every save of ours uses:
``thread_count`` writer threads (torchtitan passes none, i.e. one thread). DCP write speed on the
GPU host (bench/results/writer-threads-*): 1.05 GiB/s with 1 thread, 3.9 with 4, 7.1 with 8, 13.0
with 16, 14.0 with 32 (tmpfs, fsync on); a local disk 0.81 -> 1.88 GiB/s (1 -> 16). Hence the
default ``checkpoint_perf.writer_threads = 16``.

A failed write (a full disk) is one error from the save: DCP's extra writer threads let an
exception escape to ``threading.excepthook``, which prints a traceback per thread and drops the
error (a save whose only failure was in such a thread would even pass for a finished one). Our
writer's file system records an error raised while a file is written and ``write_data`` raises
the first one once every thread is done (``DeferringWriter``), so DCP reports it as the save's
failure and the manager turns a full disk into one line.

Touchpoints in torch (private, checked by ``supported``): ``_async_process_executor.
_ProcessGroupInitInfo``, ``_AsyncCheckpointProcess`` and the module global ``_CHECKPOINT_PROCESS``;
the same in torch 2.11 and 2.13.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
from typing import Any

from torchtitan_runai import lifetime

# torch's DCP pieces are imported where used: _async_process_executor is private (``supported`` asks
# whether this torch has it), and importing this module must not fail on a torch without it.

logger = logging.getLogger(__name__)

BLOCKED = (signal.SIGTERM, signal.SIGINT)
SHUTDOWN_WAIT_S = 5.0


def supported() -> bool:
    """Does this torch's DCP have the process-based saver pieces this module relies on?"""
    try:
        from torch.distributed.checkpoint import _async_process_executor as ape
    except ImportError:
        return False
    return all(
        hasattr(ape, name) for name in ("_ProcessGroupInitInfo", "_AsyncCheckpointProcess", "_CHECKPOINT_PROCESS")
    )


def spawn_shielded(target, *args, **kwargs):
    """Call ``target`` (which starts child processes) with SIGTERM/SIGINT blocked in this thread
    only, so the children start with them blocked. Run on a thread of its own (the mask stays)."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # its first start unblocks both signals in this thread
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
    try:
        return target(*args, **kwargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class UploadProcess:
    """DCP's checkpoint saving process, spawned at trainer start on a background thread."""

    def __init__(self):
        self.process = None  # DCP's _AsyncCheckpointProcess once constructed
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()  # the child is installed in DCP, or its start failed
        self._release = threading.Event()  # the child is stopped: the thread that created it may end

    def start(self, process_group) -> "UploadProcess":
        """Every rank, main thread, same point (the info is a collective on ``process_group``)."""
        from torch.distributed.checkpoint import _async_process_executor as ape

        info = ape._ProcessGroupInitInfo(process_group)
        info.__class__ = _classes()["DiesWithWorker"]  # the same fields, and the child dies with us
        info.worker_pid = os.getpid()
        # multiprocessing's own exit hook would terminate() and join() the child, which ignores
        # SIGTERM: on any normal interpreter exit stop it first (atexit runs hooks last-in first).
        atexit.register(self.shutdown)
        self._thread = threading.Thread(target=self._spawn, args=(info,), name="checkpoint-upload-process", daemon=True)
        self._thread.start()
        return self

    def _spawn(self, info) -> None:
        from torch.distributed.checkpoint import _async_process_executor as ape

        began = time.monotonic()
        try:
            self.process = spawn_shielded(ape._AsyncCheckpointProcess, info)
        except BaseException as exc:  # the first save then reports it (and DCP would retry)
            self.error = exc
        self.seconds = time.monotonic() - began
        if self.error is None:
            ape._CHECKPOINT_PROCESS = self.process
            logger.info(
                f"checkpoint upload process ready in {self.seconds:.1f}s (background, pid "
                f"{self.pid}; SIGTERM/SIGINT blocked there)"
            )
        else:
            logger.warning(f"checkpoint upload process could not start ({self.error!r})")
        self._ready.set()
        # The child's parent-death signal watches this thread: it lives until the child is stopped.
        self._release.wait()

    @property
    def pid(self) -> int | None:
        proc = getattr(self.process, "_save_process", None)
        return proc.pid if proc is not None else None

    def wait_ready(self) -> None:
        """Before an async save: the process is installed in DCP (or its start failed: raise)."""
        if self._thread is not None:
            self._ready.wait()
        if self.error is not None:
            raise RuntimeError(f"the checkpoint upload process could not start: {self.error!r}") from self.error

    @property
    def ready(self) -> bool:
        return self.process is not None and self._ready.is_set()

    def alive(self) -> bool:
        proc = getattr(self.process, "_save_process", None)
        return proc is not None and proc.is_alive()

    def shutdown(self, wait_s: float = SHUTDOWN_WAIT_S) -> None:
        """Stop the saving process (idle by now: callers finish uploads first). Never blocks long."""
        from torch.distributed.checkpoint import _async_process_executor as ape

        proc = getattr(self.process, "_save_process", None)
        if proc is None:
            self._release.set()
            return
        if proc.is_alive():
            try:
                self.process._send(ape._CheckpointSaveProcessControlOpts.TERMINATE)
                proc.join(wait_s)
            except (OSError, ValueError):
                pass
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        if getattr(ape, "_CHECKPOINT_PROCESS", None) is self.process:
            ape._CHECKPOINT_PROCESS = None
        self._release.set()

    def kill(self) -> None:
        """SIGKILL, no request: for an idle process when the trainer is about to exit."""
        pid = self.pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._release.set()


def writer(checkpoint_id: str, threads: int) -> Any:
    """DCP's file-system writer with ``threads`` writer threads (fsync on, as DCP's default); an
    error in any writer thread fails the save once (``DeferringWriter``)."""
    return _classes()["DeferringWriter"](str(checkpoint_id), thread_count=max(1, int(threads)))


def _classes() -> dict[str, type]:
    """Built on first use (torch stays unimported until a save); found by name at module level
    (``__getattr__``), so DCP's saving process can unpickle the writer it is sent."""
    if _CLASSES:
        return _CLASSES
    from contextlib import contextmanager

    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._async_process_executor import _ProcessGroupInitInfo
    from torch.distributed.checkpoint.filesystem import FileSystem

    class DiesWithWorker(_ProcessGroupInitInfo):
        """DCP's init info for its writing process, plus ``worker_pid``: unpickled in the child (the
        first thing it does with what it is sent), it makes the child die with that worker."""

        def __setstate__(self, state):
            state = dict(state)
            worker = state.pop("worker_pid", None)
            self.__dict__.update(state)
            lifetime.die_with_parent(worker, signal.SIGKILL)

    class DeferringFileSystem(FileSystem):
        """While ``deferring``, an error inside a file's ``create_stream`` block is recorded, not
        raised (the writer thread then goes on to its next file, which fails fast)."""

        def __init__(self) -> None:
            super().__init__()
            self.deferring = False
            self.errors: list[Exception] = []

        @contextmanager
        def create_stream(self, path, mode):
            if not self.deferring:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            try:
                with super().create_stream(path, mode) as stream:
                    yield stream
            except Exception as e:  # torch.save turns a failed write into a RuntimeError (from the OSError)
                self.errors.append(e)

    class DeferringWriter(FileSystemWriter):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.fs = DeferringFileSystem()

        def write_data(self, plan, planner):
            self.fs.deferring, self.fs.errors = True, []
            try:
                result = super().write_data(plan, planner)
            finally:
                self.fs.deferring = False
            if self.fs.errors:
                raise self.fs.errors[0]
            return result

    for cls in (DiesWithWorker, DeferringFileSystem, DeferringWriter):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        _CLASSES[cls.__name__] = cls
    return _CLASSES


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name in ("DeferringWriter", "DeferringFileSystem", "DiesWithWorker"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
