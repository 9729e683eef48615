"""Checkpoint stall: what a pinned asynchronous save costs the training loop, and how it is cut (issue #6).

Checkpoint stall
----------------
torchtitan 0.2.2's ``checkpoint.async_mode = "async_with_pinned_mem"`` copies the model and
optimizer state from the GPU into pinned, shared host memory on a background thread (DCP's
``DefaultStager``), hands it to a separate saving process (DCP's ``AsyncCheckpointerType.PROCESS``)
and makes only the next optimizer step wait for the copy. Two things cost training time:

1. With torch 2.11 (the GPU image) DCP's ``DefaultStager._stage`` calls ``StateDictStager.close()``
   after *every* staging. That (a) drops the cached pinned buffers, so every checkpoint pays the
   allocation again, and (b) clears the stager's deep-copy dispatch table, so the *next* staging
   raises ``KeyError: <class 'type'>``. torchtitan's async_save swallows that error at staging time
   and it surfaces at the following save or at exit: stock's second checkpoint on the proxy was
   never written (bench/results/checkpoint-stall-2026-11-25-*). ``build_stager`` returns the stager
   torchtitan would build (pinned, shared, async, non-blocking) whose inner ``StateDictStager`` keeps
   its buffers and dispatch table until torchtitan closes it at the end of the run. Reusing the
   buffers is safe: torchtitan waits for the previous upload before it stages again.
2. The first staging creates ~33 GB of shared memory on the 8-layer proxy and pins it: 22-26 s
   of lost training. Measured phase by phase (bench/results/pinning-*): creating the /dev/shm
   buffers 5.4 s (the GIL is held), faulting their pages in 16-21 s (inside ``cudaHostRegister`` it
   also holds the CUDA driver lock, so every kernel launch of the training thread waits), the
   register itself 1.3-1.5 s once the pages are in (blocks launches), the copy 0.6 s (free).
   ``StagingPool`` does all of that on a background thread as soon as the trainer is built, while
   the checkpoint loads and the first step compiles: pages allocated by ``posix_fallocate`` on a
   memfd and faulted in by chunked ``madvise(MADV_POPULATE_WRITE)``, both without the GIL and
   outside the driver lock; only the register (~1.4 s) still holds the driver. The first staging
   then takes its buffers from the pool by size. The host memory held is what stock holds after
   its first checkpoint, only from the start.

Without a GPU (the CPU rehearsal, a laptop) DCP refuses torchtitan's pinned options (``Non-blocking
copy requires that the current accelerator is available``): ``staging_options`` then keeps the
same path (shared-memory staging on a background thread, the checkpoint-writing process) without
pinning and non-blocking copies, so the CPU tests run what a GPU pod runs.

Float8 weights: DCP's stager copied torchao's float8 weight wrapper (FSDP float8 all-gather, the 405B
recipe) as uninitialized host memory, so such checkpoints resumed to loss NaN (issue 22).
``WrapperSafeStateDictStager``, under both stagers built here, stages the weight it wraps instead.

Nothing in torchtitan is changed or copied: the stager is handed to ``CheckpointManager.stager``,
which torchtitan fills itself only while it is ``None``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.multiprocessing
from torch.distributed.checkpoint._state_dict_stager import StateDictStager
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from torchtitan_runai.config import CheckpointPerf, wants_pinned_staging

logger = logging.getLogger(__name__)

PIN_MIN_BYTES = 5  # DCP pins storages from this size on (StateDictStager.pin_memory_min_bytes)
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault a range in without touching it from user space
POPULATE_CHUNK = 64 * 1024**2
ADAM_MOMENTS = {"adam": 2, "adamw": 2}  # optimizer name -> state tensors shaped like each parameter


def staging_options():
    """torchtitan's pinned-mode staging options (pinned, shared, async, non-blocking) where an
    accelerator is present; shared and async only (no pinning, blocking copies) where none is."""
    has = getattr(torch, "accelerator", None)
    gpu = has.is_available() if has is not None else torch.cuda.is_available()
    return StagingOptions(
        use_pinned_memory=gpu, use_shared_memory=True, use_async_staging=True, use_non_blocking_copy=gpu
    )


def wrapped_weight(tensor: Any) -> Any:
    """The plain weight inside a training-time weight wrapper (torchao's
    ``WeightWithDynamicFloat8CastTensor``, which wraps it as ``_tensor``), or ``None`` for any other
    object. A DTensor is not one: DCP's stager copies it (and its shard) correctly."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor) or not is_traceable_wrapper_subclass(tensor):
        return None
    names, _ = tensor.__tensor_flatten__()
    inner = getattr(tensor, "_tensor", None) if names[:1] == ["_tensor"] else None
    return inner if isinstance(inner, torch.Tensor) else None


class WrapperSafeStateDictStager(StateDictStager):
    """DCP's deep-copying stager, staging a float8 weight wrapper as the plain weight it wraps.

    DCP copies a tensor whose own storage has no data pointer (a wrapper subclass) as
    ``x.new_empty(x.size(), device="cpu")`` plus its attributes. For a DTensor that gives a DTensor
    whose shard is then replaced by the staged shard. torchao's float8 weight does not keep its class
    through ``new_empty``: the copy is a plain tensor of *uninitialized* host memory, the staged
    weight is set on it as a mere attribute, and that garbage is what the checkpoint writes. The
    405B recipe (float8 with FSDP float8 all-gather, ``async_with_pinned_mem``) resumed to loss NaN
    from such a checkpoint (issue 22, found by ``--rehearse``); ``async_mode = "disabled"`` writes
    the weights directly and ``"async"`` stages through DCP's other copier, both correct.

    Here the wrapper is staged as the weight it wraps (what DCP's ``"async"`` staging writes too):
    the checkpoint holds plain tensors, which load into a float8 model (the wrapper's ``copy_``
    fills the weight it wraps) and into a model without float8 or the HF export with no torchao.
    Any other wrapper subclass whose staged copy loses its class is refused rather than written.
    """

    @torch.no_grad()
    def deepcopy_with_tensor_offload(self, x, memo=None, _nil=[], non_blocking=False):  # noqa: B006 (DCP's signature)
        inner = wrapped_weight(x) if isinstance(x, torch.Tensor) else None
        if inner is not None:
            if memo is None:
                memo = {}
            y = super().deepcopy_with_tensor_offload(inner, memo, _nil, non_blocking=non_blocking)
            memo[id(x)] = y
            self._keep_alive(x, memo)
            return y
        y = super().deepcopy_with_tensor_offload(x, memo, _nil, non_blocking=non_blocking)
        if type(y) is not type(x) and is_traceable_wrapper_subclass(x):
            raise TypeError(
                f"checkpoint staging: a {type(x).__qualname__} would be staged as an uninitialized "
                f"{type(y).__qualname__} (DCP's stager keeps only classes that survive new_empty); "
                'use checkpoint.async_mode = "async" or "disabled" for this model'
            )
        return y


def stock_stager(options: StagingOptions | None = None) -> DefaultStager:
    """torchtitan's own stager (``checkpoint_perf.reuse_staging = false``): DCP's ``DefaultStager``,
    closed after every staging as torch does, over ``WrapperSafeStateDictStager``."""
    options = options or staging_options()
    stager = DefaultStager(options)
    stager._state_dict_stager = WrapperSafeStateDictStager(
        pin_memory=options.use_pinned_memory, share_memory=options.use_shared_memory
    )
    return stager


class KeptStateDictStager(WrapperSafeStateDictStager):
    """DCP's deep-copying stager (float8 wrappers staged as their weight), keeping its buffers and
    copy rules until ``release``; storages it has not staged yet take a ready buffer of their size
    from ``pool`` when there is one."""

    def __init__(self, *args, pool: StagingPool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = pool

    def close(self) -> None:  # called by DefaultStager._stage after every staging (torch 2.11)
        pass

    def release(self) -> None:
        StateDictStager.close(self)

    def _stage_untyped_storage(self, storage, *args, **kwargs):  # signature varies across torch
        if self.pool is not None and storage not in self._cached_storage_mapping:
            ready = self.pool.take(storage.nbytes())
            if ready is not None:
                ready.copy_(storage, non_blocking=bool(kwargs.get("non_blocking", args[0] if args else False)))
                self._cached_storage_mapping[storage] = ready  # later saves reuse it, as DCP would
                return ready
        return super()._stage_untyped_storage(storage, *args, **kwargs)


class ReusableStager(DefaultStager):
    """DCP's ``DefaultStager`` over a ``KeptStateDictStager``: released (with ``pool``) only at ``close``."""

    def __init__(self, config: StagingOptions, pool: StagingPool | None = None):
        super().__init__(config)
        self.pool = pool
        self._state_dict_stager = KeptStateDictStager(
            pin_memory=config.use_pinned_memory, share_memory=config.use_shared_memory, pool=pool
        )

    def close(self) -> None:  # end of run (torchtitan's CheckpointManager.close)
        super().close()
        self._state_dict_stager.release()
        if self.pool is not None:
            self.pool.release()


def build_stager(options: StagingOptions | None = None, pool: StagingPool | None = None) -> ReusableStager:
    """torchtitan's async_with_pinned_mem stager (pinned, shared, async, non-blocking copies) whose
    staged buffers and copy rules survive DCP's per-staging ``close()`` (torch 2.11), and whose
    first staging takes ready buffers from ``pool``."""
    return ReusableStager(options or staging_options(), pool)


def pool_supported() -> bool:
    """The pool hands buffers over through DCP's per-storage staging hook and its storage cache."""
    return hasattr(StateDictStager, "_stage_untyped_storage") and hasattr(StateDictStager(), "_cached_storage_mapping")


def staging_sizes(model_parts: Iterable[Any], moments: int) -> list[int]:
    """Byte sizes of the storages a checkpoint stages from this rank: each parameter's local
    storage (a DTensor's shard), ``moments`` optimizer states shaped like it, and the buffers."""
    sizes, seen = [], set()
    for part in model_parts:
        for tensor, n_states in [(p, moments) for p in part.parameters()] + [(b, 0) for b in part.buffers()]:
            for local in plain_tensors(tensor):
                storage = local.untyped_storage()
                if storage.data_ptr() in seen:
                    continue
                seen.add(storage.data_ptr())
                sizes.append(storage.nbytes())
                sizes += [local.numel() * local.element_size()] * n_states  # zeros_like(param): unpadded
    return [n for n in sizes if n >= PIN_MIN_BYTES]


def plain_tensors(tensor: Any) -> list[Any]:
    """The plain tensors that hold a parameter's data: a DTensor's shard, and inside a wrapper
    subclass (torchao's float8 weight with FSDP float8 all-gather) the tensors it wraps, whose
    storage is the one a checkpoint stages (the wrapper's own storage has no data pointer)."""
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    inners = [getattr(tensor, name) for name in names]  # a DTensor of torch 2.13 also names its mesh
    return [plain for inner in inners if isinstance(inner, torch.Tensor) for plain in plain_tensors(inner)]


def new_shared_storage(nbytes: int) -> Any:
    """A shared host storage whose pages are allocated without holding the GIL.

    torch's ``UntypedStorage._new_shared`` fallocates under the GIL (5.4 s for the proxy's 33 GB,
    stalling the training thread's Python). A memfd filled by ``os.posix_fallocate`` (which
    releases the GIL) and wrapped by torch is the same kind of storage: shared by file descriptor,
    as the saving process receives it. Other sharing strategies get torch's own call.
    """
    if not hasattr(os, "memfd_create") or torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        return torch.UntypedStorage._new_shared(nbytes, device="cpu")
    fd = os.memfd_create("checkpoint-staging", os.MFD_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)  # maps a dup of fd
    finally:
        os.close(fd)


def populate(ptr: int, nbytes: int, chunk: int = POPULATE_CHUNK) -> None:
    """Fault a host range in outside the CUDA driver lock (ctypes calls release the GIL), in chunks:
    each call holds the process's mmap lock, which the training thread's own mmap calls wait for."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = ptr - ptr % page, ptr + nbytes
    for a in range(start, end, chunk):
        n = min(chunk, end - a)
        if libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(n), MADV_POPULATE_WRITE) != 0:
            ctypes.memset(max(a, ptr), 0, min(a + n, end) - max(a, ptr))  # kernels before 5.14: touch


class StagingPool:
    """Shared host buffers by size, created, faulted in and (on a GPU) pinned on a background thread.

    ``take(nbytes)`` waits for the preparation (normally long finished) and hands out one buffer of
    exactly that size, or ``None``: DCP then allocates that storage itself, as stock does.
    """

    def __init__(self, sizes: list[int], pin: bool, device_index: int | None = None):
        self.sizes = sorted(sizes, reverse=True)
        self.pin = pin
        self.device_index = device_index
        self.seconds: float | None = None
        self.error: BaseException | None = None
        self.taken = 0
        self.missed = 0
        self._free: dict[int, list[Any]] = defaultdict(list)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._prepare, name="checkpoint-staging-pool", daemon=True)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def start(self) -> "StagingPool":
        self._thread.start()
        return self

    def _prepare(self) -> None:
        began = time.monotonic()
        try:
            if self.pin:
                torch.cuda.set_device(self.device_index)  # the context must be current on this thread
                cudart = torch.cuda.cudart()
            for n in self.sizes:
                storage = new_shared_storage(n)
                populate(storage.data_ptr(), n)
                if self.pin and n >= PIN_MIN_BYTES:
                    ptr = storage.data_ptr()
                    rc = int(cudart.cudaHostRegister(ptr, n, 1))  # 1: portable, as DCP pins
                    if rc != 0:
                        raise RuntimeError(f"cudaHostRegister({n} bytes) failed with CUDA error {rc}")
                    weakref.finalize(storage, cudart.cudaHostUnregister, ptr).atexit = False
                with self._lock:
                    self._free[n].append(storage)
        except Exception as exc:  # never let a speed-up break training: DCP allocates the rest itself
            self.error = exc
            logger.warning(
                f"checkpoint staging memory could not be prepared ({exc!r}); the first "
                "checkpoint allocates it instead (slower, as stock)"
            )
        finally:
            self.seconds = time.monotonic() - began
        if self.error is None:
            logger.info(
                f"checkpoint staging memory prepared in {self.seconds:.1f}s ({self.nbytes / 1e9:.1f} GB, background)"
            )

    def take(self, nbytes: int) -> Any:
        if self._thread.ident is not None:
            self._thread.join()
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self.taken += 1
                return free.pop()
        self.missed += 1
        return None

    def release(self) -> None:
        with self._lock:
            self._free.clear()


def install(
    manager: Any,
    checkpoint_config: Any,
    perf: "CheckpointPerf | None" = None,
    *,
    model_parts: Iterable[Any] = (),
    optimizer_name: str = "",
    stager_factory: Callable[..., Any] = build_stager,
) -> StagingPool | None:
    """Trainer wiring (pinned mode only): the reusable stager and, unless switched off, the pool
    preparing its memory now. Returns the pool (or ``None``)."""
    perf = perf or CheckpointPerf()
    if manager is None or not wants_pinned_staging(checkpoint_config):
        return None
    if getattr(manager, "stager", None) is not None:
        return None  # someone else's stager: leave it
    if not perf.reuse_staging:
        manager.stager = stock_stager()  # torchtitan's, minus what a CPU refuses, float8 staged correctly
        return None
    pool = None
    if perf.prepare_at_start and not pool_supported():
        logger.warning(
            "checkpoint_perf.prepare_at_start: this torch's DCP stager has no per-storage hook; "
            "the first checkpoint allocates its staging memory itself"
        )
    elif perf.prepare_at_start:
        moments = ADAM_MOMENTS.get(optimizer_name.lower(), 0)
        pin = torch.cuda.is_available()
        pool = StagingPool(
            staging_sizes(model_parts, moments), pin=pin, device_index=torch.cuda.current_device() if pin else None
        ).start()
    manager.stager = stager_factory(pool=pool)
    return pool
