"""Checkpoint stall and start-up time: the two one-time costs that are not in tok/s (issue #6).

Checkpoint stall
----------------
torchtitan 0.2.2's ``checkpoint.async_mode = "async_with_pinned_mem"`` copies the model and
optimizer state from the GPU into pinned, shared host memory on a background thread (DCP's
``DefaultStager``), hands it to a separate saving process (DCP's ``AsyncCheckpointerType.PROCESS``)
and only makes the optimizer step wait until the copy is done. The copy itself is fast (PCIe), but
the *first* checkpoint of a process also has to create and pin that host memory (one shared-memory
buffer per GPU tensor, ``cudaHostRegister``: the kernel faults in and locks every page). On the
8-layer 8B proxy that is ~33 GB, and the step after the first save waited ~15 s for it. DCP's stager
caches these buffers per GPU storage, so later checkpoints only pay the copy.

``StagingPrewarmer`` moves that one-time allocation off the checkpoint step: it installs the same
stager torchtitan would build (``CheckpointManager.stager``, which torchtitan creates only when it
is still ``None``) and, right after the first training step (the first moment AdamW's state
exists), stages the model and optimizer state once through it on the stager's own thread. The data
of that first staging is thrown away; the pinned buffers stay cached and the real saves reuse them.
Nothing in torchtitan is changed or copied: the stager and the state are torchtitan's public
attributes, staging is DCP's public ``DefaultStager.stage``. The installed stager also gets
``patch_class_copy`` (a torch 2.11 staging bug that made stock lose its second checkpoint).

It only acts when torchtitan would use pinned staging (checkpointing on, not ``load_only``,
``async_mode = "async_with_pinned_mem"``); otherwise ``install`` returns ``None`` and nothing is
pinned. Cost: the host memory is held from step 1 instead of from the first checkpoint (the same
amount stock holds after its first checkpoint: one copy of this rank's model + optimizer shard).

Start-up
--------
Most of launch-to-first-step is torch.compile. Inductor, AOTAutograd and Triton keep their compiled
artefacts under ``TORCHINDUCTOR_CACHE_DIR`` (default ``/tmp/torchinductor_<user>``: lost with the
pod). ``startup_env`` returns the variables the launcher should set so that a restarted pod (the
common case after a preemption) finds them on the output volume.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PINNED_MODE = "async_with_pinned_mem"
STAGED_KEYS = ("model", "optimizer")  # torchtitan's MODEL / OPTIMIZER keys in CheckpointManager.states


@dataclass
class CheckpointPerf:
    """``[checkpoint_perf]``: this fork's checkpoint-stall lever (on top of torchtitan's ``[checkpoint]``)."""

    prestage: bool = True
    """Create and pin the async-checkpoint staging memory right after the first step, in the
    background, instead of inside the first checkpoint. Only acts with
    ``checkpoint.async_mode = "async_with_pinned_mem"``."""

    prestage_after_step: int = 1
    """Step after which the staging memory is prepared (AdamW's state exists from step 1 on)."""


def wants_prestaging(checkpoint_config: Any) -> bool:
    """Whether torchtitan will stage checkpoints through pinned memory with this config."""
    return (
        bool(getattr(checkpoint_config, "enable", False))
        and not bool(getattr(checkpoint_config, "load_only", False))
        and str(getattr(checkpoint_config, "async_mode", "disabled")).lower() == PINNED_MODE
    )


def default_stager_factory():
    """The stager torchtitan 0.2.2 builds for async_with_pinned_mem: pinned, shared, async, non-blocking."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    return DefaultStager(StagingOptions(True, True, True, True))


class StagingPrewarmer:
    """Prepares DCP's pinned staging memory once, after step ``after_step``, on the stager's thread.

    Wiring (trainer): ``p = StagingPrewarmer.install(self.checkpointer, job_config.checkpoint)``
    after the checkpointer exists; ``if p: p.after_step(self.step)`` after every train step.
    """

    def __init__(self, manager: Any, after_step: int = 1):
        self.manager = manager
        self.after_step_n = max(1, int(after_step))
        self.started_at: float | None = None
        self.seconds: float | None = None  # wall time of the prestaging, once done
        self.error: BaseException | None = None
        self.future = None
        self._lock = threading.Lock()

    @classmethod
    def install(
        cls,
        manager: Any,
        checkpoint_config: Any,
        perf: CheckpointPerf | None = None,
        stager_factory: Callable[[], Any] = default_stager_factory,
    ) -> "StagingPrewarmer | None":
        perf = perf or CheckpointPerf()
        if not perf.prestage or manager is None or not wants_prestaging(checkpoint_config):
            return None
        # torchtitan builds its stager lazily in save() only while this is None; built here (main
        # thread, after CUDA is initialised: DefaultStager creates its stream here) it is the one
        # every save uses, so the buffers it caches are the ones the saves reuse.
        if getattr(manager, "stager", None) is None:
            manager.stager = stager_factory()
        patch_class_copy(manager.stager)
        return cls(manager, perf.prestage_after_step)

    def state_to_stage(self) -> dict[str, Any]:
        """Model and optimizer state as torchtitan saves them (same tensors, hence same storages)."""
        states: Mapping[str, Any] = self.manager.states
        return {k: states[k].state_dict() for k in STAGED_KEYS if states.get(k) is not None}

    def after_step(self, step: int) -> bool:
        """Call after every train step; starts the prestaging once. True when it started now."""
        if self.future is not None or step < self.after_step_n:
            return False
        with self._lock:
            if self.future is not None:
                return False
            self.started_at = time.monotonic()
            try:
                self.future = self.manager.stager.stage(self.state_to_stage())
            except Exception as exc:  # never let a speed-up break training: stock behaviour remains
                self.error = exc
                self.future = _Done()
                logger.warning(f"checkpoint prestaging failed, first save will stage as stock: {exc!r}")
                return False
        if hasattr(self.future, "add_done_callback"):
            self.future.add_done_callback(self._done)
        else:  # a synchronous stager returns the staged dict itself
            self.future = _Done()
            self._done(self.future)
        return True

    def _done(self, future: Any) -> None:
        self.seconds = time.monotonic() - (self.started_at or time.monotonic())
        exc = future.exception() if hasattr(future, "exception") else None
        if exc is not None:
            self.error = exc
            logger.warning(f"checkpoint prestaging failed after {self.seconds:.1f}s: {exc!r}")
        else:
            logger.info(f"checkpoint staging memory prepared in {self.seconds:.1f}s (background)")

    def wait(self, timeout: float | None = None) -> None:
        if self.future is not None and hasattr(self.future, "result"):
            try:
                self.future.result(timeout=timeout)
            except Exception:
                pass


def _deepcopy_atomic(x, memo, non_blocking=False):  # the name is what DCP's stager dispatches on
    return x


def patch_class_copy(stager: Any) -> bool:
    """Teach DCP's staging deep-copy that class objects are atomic (as ``copy.deepcopy`` does).

    torch 2.11's ``StateDictStager`` has no rule for ``type``: any plain object in the saved state
    (reduced to ``(cls, ...)``) raises ``KeyError: <class 'type'>`` in the staging thread. Measured on
    the proxy: stock ``async_with_pinned_mem`` lost its second checkpoint that way (the error only
    surfaces at the next save or at exit). Newer torch has the rule; then this does nothing.
    Returns True when the rule was added.
    """
    table = getattr(getattr(stager, "_state_dict_stager", None), "_deepcopy_dispatch", None)
    if not isinstance(table, dict) or type in table:
        return False
    table[type] = _deepcopy_atomic
    return True


class _Done:
    def result(self, timeout: float | None = None):
        return None

    def exception(self):
        return None

    def done(self) -> bool:
        return True


def startup_env(output_dir: str | os.PathLike, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Variables the launcher should add to the workers' environment (never overriding the user's).

    - ``TORCHINDUCTOR_CACHE_DIR`` on the output volume: a restarted pod reuses compiled kernels
      (Inductor's FX-graph cache, AOTAutograd cache and Triton binaries all live under it).
    - FX-graph and AOTAutograd caches switched on explicitly (defaults differ across torch builds).
    - ``PYTORCH_ALLOC_CONF=expandable_segments:True``: what torchtitan's own run_train.sh sets; it is
      what lets the big-batch recipes fit (docs/performance.md).
    """
    env = dict(env or {})
    wanted = {
        "TORCHINDUCTOR_CACHE_DIR": str(Path(output_dir) / ".cache" / "inductor"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
        "PYTORCH_ALLOC_CONF": "expandable_segments:True",
    }
    return {k: v for k, v in wanted.items() if k not in env and not (
        k == "PYTORCH_ALLOC_CONF" and "PYTORCH_CUDA_ALLOC_CONF" in env)}
