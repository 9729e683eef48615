"""Preemption signals: SIGTERM and SIGINT only set a flag, and the ranks agree on it at a step boundary.

``StopFlag``: Kubernetes sends SIGTERM to the pod, torchrun forwards it to every rank. At each step
boundary the ranks all-reduce the flag (``agree``), so all of them stop at the same step, finish the
upload in flight, save a full checkpoint and exit 143 (130 for Ctrl-C). A second signal is logged
and ignored: the save under way finishes. A signal that comes before this process has finished a
training step (loading, compiling, the first step) leaves at once through ``before_first_step``
(nothing new to save; the folder is as it was), so a pod preempted while starting neither waits for
torchrun's kill nor leaves a half-written folder.
"""

from __future__ import annotations

import os
import signal
import sys
import time


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
            print(
                f"[resilience] rank {rank}: received {name} again; ignored: the checkpoint under way is finished first",
                file=sys.stderr,
                flush=True,
            )
            return
        self.signum = signum
        self.when = time.monotonic()
        leave = self.before_first_step
        if leave is not None:
            print(
                f"[resilience] rank {rank}: received {name} before this process finished a training step: "
                f"nothing new to save, the checkpoint folder is unchanged; exiting {128 + signum}",
                file=sys.stderr,
                flush=True,
            )
            leave(signum)
            return
        print(
            f"[resilience] rank {rank}: received {name}; will finish the upload in flight, save a checkpoint "
            "at the next step boundary and exit",
            file=sys.stderr,
            flush=True,
        )


def agree(local_signal: int, device) -> int:
    """The signal any rank received (max over ranks): every rank stops at the same step."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local_signal
    t = torch.tensor([local_signal], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
