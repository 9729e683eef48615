"""Checkpoint stall and start-up time: the two one-time costs that are not in tok/s (issue #6).

Checkpoint stall
----------------
torchtitan 0.2.2's ``checkpoint.async_mode = "async_with_pinned_mem"`` copies the model and
optimizer state from the GPU into pinned, shared host memory on a background thread (DCP's
``DefaultStager``), hands it to a separate saving process (DCP's ``AsyncCheckpointerType.PROCESS``)
and makes only the next optimizer step wait for the copy. Creating and pinning that host memory
(~33 GB on the 8-layer proxy: shared-memory buffers + ``cudaHostRegister``) is the expensive part:
~25 s of lost training on the proxy (bench/results/checkpoint-stall-*).

With torch 2.11 (the GPU image) DCP's ``DefaultStager._stage`` calls ``StateDictStager.close()``
after *every* staging, which (a) drops the cached pinned buffers, so every checkpoint pays the
allocation again, and (b) clears the stager's deep-copy dispatch table, so the *next* staging
raises ``KeyError: <class 'type'>`` on the first dict or class object. torchtitan's async_save swallows
that error at staging time when it is already done (training goes on, nothing is written) and it
surfaces at the following save or at exit. Measured on the proxy: stock's second checkpoint was
never written and the run died (bench/results/checkpoint-stall-2026-11-25-*).

``build_stager`` returns the stager torchtitan would build (pinned, shared, async, non-blocking)
whose inner ``StateDictStager`` keeps its buffers and dispatch table across stagings; they are
released once, when torchtitan closes the stager at the end of the run. Reusing the buffers is
safe: torchtitan waits for the previous upload (``_async_wait``) before it stages again.
``install`` puts it into ``CheckpointManager.stager`` (torchtitan builds its own only while that is
``None``). Nothing in torchtitan is changed or copied.

``StagingPrewarmer`` (opt-in, ``[checkpoint_perf] prestage``) stages once right after step 1 so the
first checkpoint finds its buffers ready. Measured: the background pinning blocked the training
thread itself for ~20 s (step 2), so it moves the one-time cost instead of removing it; off by
default.

Start-up
--------
Launch to first step on the proxy (bench/results/startup-2026-11-25-*): 33.8 s with an empty
compile cache and 21.4 s with the same cache again. About 17 s of both comes before torchtitan's
first log line (torchrun and imports). Inductor, AOTAutograd and Triton keep their compiled
artefacts under ``TORCHINDUCTOR_CACHE_DIR`` (default ``/tmp/torchinductor_<user>``, which is lost
with the pod). ``startup_env`` returns the variables the launcher should set so that a restarted pod
(the common case after a preemption) finds them on the output volume.
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

    reuse_staging: bool = True
    """With ``checkpoint.async_mode = "async_with_pinned_mem"``: stage through ``build_stager`` (pinned
    buffers kept across checkpoints; works around torch 2.11's per-save close, see above)."""

    prestage: bool = False
    """Also stage once right after step ``prestage_after_step`` so the first checkpoint finds its
    buffers ready. Measured: the pinning then blocks training for about as long (~20 s on the
    proxy) at that step instead: off by default."""

    prestage_after_step: int = 1
    """Step after which the staging memory is prepared (AdamW's state exists from step 1 on)."""


def wants_prestaging(checkpoint_config: Any) -> bool:
    """Whether torchtitan will stage checkpoints through pinned memory with this config."""
    return (
        bool(getattr(checkpoint_config, "enable", False))
        and not bool(getattr(checkpoint_config, "load_only", False))
        and str(getattr(checkpoint_config, "async_mode", "disabled")).lower() == PINNED_MODE
    )


def build_stager(options=None):
    """torchtitan's async_with_pinned_mem stager (pinned, shared, async, non-blocking copies) whose
    staged buffers and copy rules survive DCP's per-staging ``close()`` (torch 2.11)."""
    from torch.distributed.checkpoint._state_dict_stager import StateDictStager
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    class KeptStateDictStager(StateDictStager):
        def close(self) -> None:  # called by DefaultStager._stage after every staging (torch 2.11)
            pass

        def release(self) -> None:
            StateDictStager.close(self)

    class ReusableStager(DefaultStager):
        def __init__(self, config):
            super().__init__(config)
            self._state_dict_stager = KeptStateDictStager(pin_memory=config.use_pinned_memory,
                                                          share_memory=config.use_shared_memory)

        def close(self) -> None:  # end of run (torchtitan's CheckpointManager.close)
            super().close()
            self._state_dict_stager.release()

    return ReusableStager(options or StagingOptions(True, True, True, True))


default_stager_factory = build_stager


def install(manager: Any, checkpoint_config: Any, perf: "CheckpointPerf | None" = None,
            stager_factory: Callable[[], Any] = build_stager) -> "StagingPrewarmer | None":
    """Trainer wiring: the reusable stager (pinned mode only) and, if asked, the prewarmer."""
    perf = perf or CheckpointPerf()
    if manager is None or not wants_prestaging(checkpoint_config):
        return None
    if perf.reuse_staging and getattr(manager, "stager", None) is None:
        manager.stager = stager_factory()
    return StagingPrewarmer.install(manager, checkpoint_config, perf, stager_factory)


class StagingPrewarmer:
    """Prepares DCP's pinned staging memory once, after step ``after_step``, on the stager's thread.

    Built by ``install`` when ``[checkpoint_perf] prestage`` is on; the trainer calls
    ``after_step(self.step)`` after every train step.
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
