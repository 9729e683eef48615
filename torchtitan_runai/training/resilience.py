"""Preemption, hangs and restarts: the per-rank machinery behind ``RunaiTrainer``.

- ``StopFlag``: SIGTERM and SIGINT only set a flag (Kubernetes sends SIGTERM to the pod, torchrun
  forwards it to every rank). At each step boundary the ranks all-reduce the flag, so all of them
  stop at the same step, finish the upload in flight, save a full checkpoint and exit 143 (130 for
  Ctrl-C). A second signal is logged and ignored: the save under way finishes. A signal that comes
  before this process has finished a training step (loading, compiling, the first step) leaves at
  once through ``before_first_step`` (nothing new to save; the folder is as it was), so a pod
  preempted while starting neither waits for torchrun's kill nor leaves a half-written folder.
- ``Watchdog``: a thread per rank. Each rank publishes a heartbeat (time, step, pid, host) to the
  rendezvous store every few seconds. When this rank's training has not advanced for
  ``resilience.hang_timeout_seconds``, it finds the rank(s) whose heartbeat stopped (a frozen or
  stopped process) or that are behind, logs one line naming them, SIGKILLs frozen ranks on its own
  host (torchrun would otherwise wait its shutdown grace for a stopped process), writes torchrun's
  error file and exits ``EXIT_HUNG``; the launcher turns that into a restartable exit.
- ``init_gloo``: creating a gloo process group right after a torchrun restart fails often on torch
  2.13 (``Gloo connectFullMesh failed ... Connection refused``). All ranks retry together under a
  fresh store prefix per attempt.
- ``StepTrace``: with ``TORCHTITAN_RUNAI_STEP_TRACE=<file>``, rank 0 appends each step's exact
  local loss (``float.hex``) and the restart count: how the tests compare runs bit for bit.
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

EXIT_HUNG = 124
STEP_TRACE_ENV = "TORCHTITAN_RUNAI_STEP_TRACE"
# Set by the launcher: where a watchdog leaves its verdict. The ranks it SIGKILLs may be reported
# to torchrun before the detecting rank's own exit, so the launcher reads the verdict from here.
HANG_VERDICT_ENV = "TORCHTITAN_RUNAI_HANG_VERDICT"


# ---------------------------------------------------------------------------------------------
# Signals


class StopFlag:
    """Set by SIGTERM/SIGINT; read at step boundaries.

    ``before_first_step``: while set (a callable taking the signal number; it must not return),
    the first signal leaves through it at once instead of waiting for a step boundary."""

    def __init__(self):
        self.signum = 0
        self.when = 0.0
        self.before_first_step = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        rank = os.environ.get("RANK", "?")
        name = signal.Signals(signum).name
        if self.signum:
            print(f"[resilience] rank {rank}: received {name} again; ignored: the checkpoint under way is "
                  "finished first", file=sys.stderr, flush=True)
            return
        self.signum = signum
        self.when = time.monotonic()
        leave = self.before_first_step
        if leave is not None:
            print(f"[resilience] rank {rank}: received {name} before this process finished a training step: "
                  f"nothing new to save, the checkpoint folder is unchanged; exiting {128 + signum}",
                  file=sys.stderr, flush=True)
            leave(signum)
            return
        print(f"[resilience] rank {rank}: received {name}; will finish the upload in flight, save a checkpoint "
              "at the next step boundary and exit", file=sys.stderr, flush=True)


def agree(local_signal: int, device) -> int:
    """The signal any rank received (max over ranks): every rank stops at the same step."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local_signal
    t = torch.tensor([local_signal], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ---------------------------------------------------------------------------------------------
# Process group creation that survives torchrun restarts


def init_gloo(timeout_s: float, attempts: int = 5) -> None:
    """init_process_group("gloo") with retries, each attempt under a fresh store prefix.

    Every rank must take the same number of attempts: after each one, the ranks publish success or
    failure to the store and retry unless all succeeded.
    """
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=timeout_s)))
    last_error = None
    for attempt in range(attempts):
        prefix = f"runai/restart{restart}/pg{attempt}"
        sub = dist.PrefixStore(prefix, store)
        ok = True
        try:
            dist.init_process_group("gloo", store=dist.PrefixStore("pg", sub), rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
            dist.barrier()
        except Exception as e:  # gloo raises RuntimeError/DistBackendError: retry all of them
            ok, last_error = False, e
        sub.set(f"result/{rank}", b"1" if ok else b"0")
        sub.wait([f"result/{r}" for r in range(world)], timedelta(seconds=timeout_s))
        results = sub.multi_get([f"result/{r}" for r in range(world)])
        if all(r == b"1" for r in results):
            if attempt:
                print(f"[resilience] rank {rank}: process group ready on attempt {attempt + 1}", file=sys.stderr,
                      flush=True)
            return
        if dist.is_initialized():
            dist.destroy_process_group()
        print(f"[resilience] rank {rank}: process group attempt {attempt + 1} failed "
              f"({type(last_error).__name__ if last_error else 'a peer failed'}); retrying", file=sys.stderr,
              flush=True)
        time.sleep(0.5 + 0.5 * attempt)
    raise RuntimeError(f"could not create the gloo process group in {attempts} attempts: {last_error}")


# ---------------------------------------------------------------------------------------------
# Hang watchdog


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
        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=30), wait_for_workers=False)
        self._store = dist.PrefixStore(f"runai/heartbeat/{restart}", base)
        self._thread = threading.Thread(target=self._run, name="runai-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # watchdog thread -----------------------------------------------------------------------
    def _beat(self) -> None:
        self._store.set(f"hb/{self.rank}", json.dumps({"t": time.time(), "step": self.step, "pid": os.getpid(),
                                                       "host": socket.gethostname()}))

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
        frozen = sorted(r for r in range(self.world) if r != self.rank and
                        (r not in second or second[r].get("t") == first.get(r, {}).get("t")))
        behind = []
        if not frozen and second:
            low = min(v.get("step", 0) for v in second.values())
            if any(v.get("step", 0) != low for v in second.values()):
                behind = sorted(r for r, v in second.items() if v.get("step", 0) == low)
        if frozen:
            who = "hung rank(s) " + ", ".join(
                f"{r} (pid {second.get(r, first.get(r, {})).get('pid', '?')} on "
                f"{second.get(r, first.get(r, {})).get('host', '?')}, heartbeat stopped)" for r in frozen)
        elif behind:
            who = "hung rank(s) " + ", ".join(str(r) for r in behind) + " (behind the others)"
        else:
            who = "every rank is waiting: a collective or I/O never completed"
        line = (f"hang detected by rank {self.rank}: no training progress for {stalled:.0f}s "
                f"(resilience.hang_timeout_seconds = {self.timeout_s:.0f}, last step {self.step}); {who}; "
                f"exiting {EXIT_HUNG} so the job restarts")
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
        os._exit(EXIT_HUNG)


def write_hang_verdict(line: str) -> None:
    path = os.environ.get(HANG_VERDICT_ENV)
    if not path:
        return
    try:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(line)
        os.replace(tmp, path)
    except OSError:  # the launcher then reports the failures torchrun saw
        pass


# ---------------------------------------------------------------------------------------------
# Exact per-step record for tests and debugging


class StepTrace:
    def __init__(self):
        self.path = os.environ.get(STEP_TRACE_ENV)
        self.restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        # Only rank 0 records; elsewhere the loss is never read back (no per-step host sync).
        self.enabled = bool(self.path) and int(os.environ.get("RANK", "0")) == 0

    def record(self, step: int, loss) -> None:
        if not self.enabled:
            return
        value = float(loss)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "loss": value.hex(), "restart": self.restart}) + "\n")
