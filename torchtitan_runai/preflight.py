"""Preflight: will this job fit, and can this machine run it? Checked before torchrun starts.

Usage::

    python -m torchtitan_runai.preflight --config FILE [--nodes N] [--gpus-per-node G]
        [--gpu-memory-gib 79.6] [--dry-run] [torchtitan overrides, e.g. --training.local_batch_size 2]

The launcher runs the same checks (``run_preflight``) once per pod, after parsing the config and
before torchrun. Each check gives a ``Finding`` (``ok``, ``warning`` or ``error``); the command
prints a short report and exits 2 when there is an error. Checks that depend on the machine (free
disk, writable folder, tokenizer files) are errors in a real launch and warnings in a dry run
(``--dry-run``), where the machine is usually not the one that will train.

What is checked
---------------

``config``       the TOML against torchtitan's schema plus ours, and the values
                 (``config.parse_job_config``; a mistake there stops the command at once, exit 2);
``parallelism``  the parallel degrees against nodes x GPUs per node;
``memory``       an estimate of the peak GPU memory per rank against the GPU's memory (the visible
                 GPU's, ``--gpu-memory-gib``, else an H100 80GB; ``estimate_memory``, below). It is
                 an error only when the estimate exceeds the GPU by more than the estimator's
                 tolerance (10%), a warning when it is within it;
``checkpoint``   the checkpoint folder (``$OUTPUT_DIR/<checkpoint.folder>``, see
                 ``torchtitan_runai.storage``) is writable (a real file is created and removed, so a
                 read-only mount is caught even as root) and has room for one full checkpoint
                 (12 bytes per parameter: fp32 weights and AdamW's two moments);
``/dev/shm``     a warning when it is Docker's 64 MiB default: the dataloader workers and NCCL use
                 it (``--large-shm`` in Run:ai, an ``emptyDir: {medium: Memory}`` in a PyTorchJob);
``host memory``  with ``checkpoint.async_mode = "async_with_pinned_mem"``, every rank keeps its share of
                 the checkpoint in pinned host memory for the whole run (prepared at start,
                 ``torchtitan_runai.ckpt_perf``): an error when the node's ranks together need more
                 than 80% of the container's memory limit (cgroup) or of the node's RAM, which would
                 otherwise end in the kernel's OOM killer with no message;
``tokenizer``    the tokenizer is in ``model.hf_assets_path`` or the Hub cache, or can be downloaded
                 (``hub.repo_id`` set, downloads allowed); nothing is downloaded here. A Hub
                 download without ``HF_TOKEN`` is a warning: Meta's repos are gated.

The memory estimate
-------------------

``estimate_memory(model_args, settings)`` is pure arithmetic (no torch, no GPU). It returns the
peak per GPU as a breakdown in GiB:

==================  ===============================================================================
consumer            model
==================  ===============================================================================
parameters          fp32 weights, sharded over FSDP (dp_shard x cp), TP and PP.
gradients           fp32, sharded like the weights. They exist from the backward pass to the next
                    ``zero_grad`` (torchtitan sets them to None), so they peak at the optimizer step,
                    when the activations are gone.
optimizer           AdamW's two fp32 moments, sharded like the weights.
weights in flight   FSDP: the bf16 (float8 all-gather: 1 byte) unsharded weights of the blocks being
                    computed and prefetched (2 blocks) and the output layer at the loss. One GPU
                    without FSDP: autocast's bf16 copies of every weight, kept for the backward pass
                    (float8: 1-byte copies of the block weights, bf16 output layer).
activations         per transformer block and token, by ``activation_checkpoint.mode``: none,
                    selective ``op``, selective every-``N``-th layer, full (block inputs only, plus
                    one block recomputed in the backward pass); sharded by TP (sequence parallel)
                    and CP; with PP, the microbatches in flight of the stage's blocks.
logits              seq x vocab per sample at the loss (bf16 output, fp32 upcast, gradient; fewer
                    bytes when torch.compile fuses the loss); sharded by TP with loss parallel.
comm buffers        FSDP's reduce-scatter of one block's fp32 gradients (0 on one GPU).
allocator           the caching allocator's fragmentation and workspaces: 1 GiB + 3%.
cuda context        CUDA/NCCL context outside PyTorch's allocator (1 GiB); counted in the fit, not in
                    ``allocator_peak_gib`` (comparable to ``torch.cuda.max_memory_reserved``).
==================  ===============================================================================

Two moments compete for the peak: the start of the backward pass (weights in flight, all saved
activations and the logits) and the optimizer step (gradients instead). The larger one is the
estimate. The per-token activation and logit coefficients are not derivable from first principles
(torch.compile decides what to save), so they are calibrated against measured peaks of the 8-layer
Llama 3.1 8B proxy on an H100 (``bench/memory_estimate.py``, results in
``bench/results/memory-estimate-*.md``): within 10% of ``max_reserved`` on that proxy; other shapes
use the same per-element coefficients, scaled by dim, FFN width, KV width and vocabulary.

Shared checkpoint folder
------------------------

``confirm_shared_folder(folder, rank, world_size, job_key)`` runs on every rank at start: rank 0
writes a marker with a random nonce into the checkpoint folder, the nonce is broadcast, and every
other rank reads the marker and compares. A node-local folder (``emptyDir``, ``hostPath``) or a
ReadWriteOnce volume on a multi-node job is then one clear error at start instead of checkpoints
that no restart can resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torchtitan_runai.errors import UserError, cli

GIB = 1024**3
DEFAULT_GPU_MEMORY_GIB = 79.6
"""An H100 80GB: 81,559 MiB as nvidia-smi reports it; assumed when no GPU is visible."""

FIT_TOLERANCE = 0.10
"""The estimator's measured accuracy; beyond it a miss is an error, within it a warning."""

SHM_DEFAULT_BYTES = 64 * 1024**2
CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights + AdamW exp_avg + exp_avg_sq (storage.py)

# ---------------------------------------------------------------------------------------------
# Calibrated coefficients (bench/results/memory-estimate-*.md). Activations are bytes per token per
# transformer block, as a count of bf16 elements of width dim, kv_dim (n_kv_heads x head_dim) and
# the FFN's hidden width; "op" and "none" are what torch.compile saves for those AC modes.

ACT_ELEMENTS = {  # (dim, kv_dim, hidden) multipliers, bf16 elements per token per block
    "none": (4.0, 2.0, 4.0),
    "op": (4.0, 2.0, 1.0),
}
EAGER_ACT_FACTOR = {"none": 1.3, "op": 1.75}
"""Without torch.compile nothing is fused: more intermediates are saved (eager proxy, selective op)."""
FLOAT8_ACT_FACTOR = {"none": 0.82, "op": 1.35}
"""float8 (torchao, compiled): 1-byte saved inputs of the linears shrink "none"; with selective op AC
the saved _scaled_mm outputs and casts grow "op" (measured)."""
LOGIT_BYTES = {True: 3.2, False: 10.0}
"""Bytes per logit at the loss: compiled (fused upcast + cross-entropy) / eager (bf16 output + fp32
upcast + fp32 gradient)."""
ALLOCATOR_FIXED_GIB = 1.0
ALLOCATOR_FRACTION = 0.03
CUDA_CONTEXT_GIB = 1.0
FSDP_BLOCKS_IN_FLIGHT = 2


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama model that memory depends on."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab_size: int

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * (self.dim // self.n_heads)

    @property
    def block_params(self) -> int:
        attn = 2 * self.dim * self.dim + 2 * self.dim * self.kv_dim
        return attn + 3 * self.dim * self.ffn_hidden + 2 * self.dim

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.dim

    @property
    def params(self) -> int:
        """Embedding + blocks + final norm + (untied) output layer."""
        return 2 * self.embedding_params + self.n_layers * self.block_params + self.dim


def ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Llama 3's FeedForward width (as torchtitan's llama3 model computes it)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def model_shape(model_args: Any) -> ModelShape:
    """From torchtitan's llama3 ``TransformerModelArgs`` (or anything with the same fields)."""
    n_heads = model_args.n_heads
    return ModelShape(
        dim=model_args.dim,
        n_layers=model_args.n_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(model_args, "n_kv_heads", None) or n_heads,
        ffn_hidden=ffn_hidden_dim(model_args.dim, getattr(model_args, "multiple_of", 256),
                                  getattr(model_args, "ffn_dim_multiplier", None)),
        vocab_size=model_args.vocab_size,
    )


@dataclass(frozen=True)
class TrainSettings:
    """The job-config values memory depends on (``from_config`` reads them from a JobConfig)."""

    seq_len: int = 8192
    local_batch_size: int = 1
    ac_mode: str = "selective"
    """activation_checkpoint.mode: none | selective | full | memory_budget."""
    ac_option: str = "op"
    """activation_checkpoint.selective_ac_option: "op" or a layer frequency N."""
    compile: bool = True
    float8: bool = False
    float8_all_gather: bool = False
    dp_replicate: int = 1
    dp_shard: int = 1
    """Resolved (no -1)."""
    tp: int = 1
    cp: int = 1
    pp: int = 1
    pp_microbatches: int = 1
    loss_parallel: bool = True

    @classmethod
    def from_config(cls, config: Any, world_size: int) -> "TrainSettings":
        p, ac = config.parallelism, config.activation_checkpoint
        fixed = p.data_parallel_replicate_degree * p.tensor_parallel_degree * p.context_parallel_degree
        fixed *= p.pipeline_parallel_degree
        shard = p.data_parallel_shard_degree
        if shard == -1:
            shard = max(world_size // fixed, 1)
        converters = list(getattr(config.model, "converters", []) or [])
        float8 = any("float8" in c for c in converters)
        f8 = getattr(getattr(getattr(config, "quantize", None), "linear", None), "float8", None)
        pp_mb = getattr(p, "pipeline_parallel_microbatch_size", 1) or 1
        return cls(
            seq_len=config.training.seq_len,
            local_batch_size=config.training.local_batch_size,
            ac_mode=ac.mode,
            ac_option=str(ac.selective_ac_option),
            compile=bool(config.compile.enable and "model" in config.compile.components),
            float8=float8,
            float8_all_gather=bool(getattr(f8, "enable_fsdp_float8_all_gather", False)),
            dp_replicate=p.data_parallel_replicate_degree,
            dp_shard=shard,
            tp=p.tensor_parallel_degree,
            cp=p.context_parallel_degree,
            pp=p.pipeline_parallel_degree,
            pp_microbatches=max(config.training.local_batch_size // pp_mb, 1),
            loss_parallel=not p.disable_loss_parallel,
        )

    @property
    def fsdp(self) -> bool:
        return self.dp_shard * self.cp > 1


@dataclass
class MemoryEstimate:
    """Peak GPU memory per rank. ``breakdown`` is in GiB, at the moment of the peak."""

    breakdown: dict[str, float]
    moment: str
    """"backward start" (activations + logits) or "optimizer step" (gradients)."""
    other_moment_gib: float
    params: int

    @property
    def allocator_peak_gib(self) -> float:
        """Comparable to torch.cuda.max_memory_reserved (no CUDA context)."""
        return sum(v for k, v in self.breakdown.items() if k != "cuda context")

    @property
    def total_gib(self) -> float:
        return sum(self.breakdown.values())

    @property
    def biggest(self) -> str:
        return max(self.breakdown, key=self.breakdown.get)


def _activation_bytes_per_block(shape: ModelShape, s: TrainSettings, mode: str) -> float:
    """Bytes per token saved by one block, mode "none" or "op"."""
    d, kv, h = ACT_ELEMENTS[mode]
    elements = d * shape.dim + kv * shape.kv_dim + h * shape.ffn_hidden
    factor = 1.0 if s.compile else EAGER_ACT_FACTOR[mode]
    if s.float8:
        factor *= FLOAT8_ACT_FACTOR[mode]
    return 2 * elements * factor


def _activations(shape: ModelShape, s: TrainSettings) -> tuple[float, str]:
    layers = -(-shape.n_layers // s.pp)
    tokens = s.seq_len * s.local_batch_size / (s.tp * s.cp)
    if s.pp > 1:  # 1F1B: up to pp microbatches of the stage in flight, never more than exist
        tokens = tokens / s.pp_microbatches * min(s.pp, s.pp_microbatches)
    none = _activation_bytes_per_block(shape, s, "none")
    block_input = 2 * shape.dim
    mode, option = s.ac_mode, s.ac_option
    if mode == "none":
        per_token = layers * none
        what = "none"
    elif mode == "full":
        per_token = layers * block_input + none  # + one block recomputed in the backward pass
        what = "full"
    elif mode == "selective" and option == "op":
        per_token = layers * _activation_bytes_per_block(shape, s, "op") + block_input
        what = "selective op"
    elif mode == "selective" and option.isdigit() and int(option) >= 1:
        n = int(option)
        checkpointed = layers // n
        per_token = checkpointed * block_input + (layers - checkpointed) * none + (none if checkpointed else 0)
        what = f"selective every {n} layer(s)"
    else:  # memory_budget and anything new: the compiler trades between none and full; assume half
        per_token = layers * (none + block_input) / 2
        what = mode
    return per_token * tokens, what


def estimate_memory(model_args: Any, settings: TrainSettings) -> MemoryEstimate:
    """Peak GPU memory per rank for a Llama model and the job's settings (see module docstring)."""
    shape = model_args if isinstance(model_args, ModelShape) else model_shape(model_args)
    s = settings
    shard = s.dp_shard * s.cp * s.tp * s.pp
    params = shape.params
    local = params / shard
    parameters = 4 * local
    gradients = 4 * local
    optimizer = 8 * local
    if s.fsdp:
        gathered = 1 if (s.float8 and s.float8_all_gather) else 2
        in_flight = gathered * FSDP_BLOCKS_IN_FLIGHT * shape.block_params / s.tp
        in_flight += 2 * shape.embedding_params / s.tp  # the output layer, unsharded at the loss
        comm = 4 * shape.block_params / s.tp  # one block's fp32 gradients, reduce-scattered
    else:
        blocks = shape.n_layers * shape.block_params / (s.tp * s.pp)
        # float8 (torchao) keeps the fp32 weights for its backward and casts again: no block copies
        in_flight = (0 if s.float8 else 2) * blocks + 2 * shape.embedding_params / s.tp
        comm = 0.0
    activations, _ = _activations(shape, s)
    logit_shard = s.tp if s.loss_parallel else 1
    logits = (s.seq_len / s.cp) * s.local_batch_size * shape.vocab_size * LOGIT_BYTES[s.compile] / logit_shard
    if s.pp > 1:
        logits /= s.pp_microbatches  # the loss runs per microbatch, on the last stage only
    persistent = parameters + optimizer
    backward = persistent + in_flight + activations + logits + comm
    step = persistent + gradients + comm
    moment = "backward start" if backward >= step else "optimizer step"
    if moment == "backward start":
        parts = {"parameters": parameters, "gradients": 0.0, "optimizer": optimizer, "weights in flight": in_flight,
                 "activations": activations, "logits": logits, "comm buffers": comm}
    else:
        parts = {"parameters": parameters, "gradients": gradients, "optimizer": optimizer, "weights in flight": 0.0,
                 "activations": 0.0, "logits": 0.0, "comm buffers": comm}
    breakdown = {k: v / GIB for k, v in parts.items()}
    peak = sum(breakdown.values())
    breakdown["allocator"] = ALLOCATOR_FIXED_GIB + ALLOCATOR_FRACTION * peak
    breakdown["cuda context"] = CUDA_CONTEXT_GIB
    other = (step if moment == "backward start" else backward) / GIB
    return MemoryEstimate(breakdown=breakdown, moment=moment, other_moment_gib=other, params=params)


# ---------------------------------------------------------------------------------------------
# Fit


@dataclass(frozen=True)
class Finding:
    """One check's outcome."""

    level: str
    """"ok", "warning" or "error"."""
    check: str
    message: str


def _advice(estimate: MemoryEstimate, settings: TrainSettings | None) -> str:
    biggest = estimate.biggest
    s = settings or TrainSettings()
    if biggest == "activations":
        if s.ac_mode != "full":
            return ('set activation_checkpoint.mode = "full" (or selective_ac_option = "op"), lower '
                    "training.local_batch_size, or raise parallelism.tensor_parallel_degree")
        return "lower training.local_batch_size or training.seq_len, or raise parallelism.tensor_parallel_degree"
    if biggest == "logits":
        return ("lower training.local_batch_size, or raise parallelism.tensor_parallel_degree (the loss is "
                "sharded with loss parallel); enable compile to fuse the loss")
    if biggest in ("parameters", "gradients", "optimizer", "weights in flight"):
        return ("shard the model over more GPUs: more nodes with data_parallel_shard_degree = -1 (FSDP), or raise "
                "parallelism.tensor_parallel_degree / pipeline_parallel_degree")
    return "lower training.local_batch_size"


def check_fit(estimate: MemoryEstimate, gpu_memory_gib: float, settings: TrainSettings | None = None) -> Finding:
    """Does the estimate fit in ``gpu_memory_gib``? The message names the biggest consumer and a fix."""
    total = estimate.total_gib
    share = estimate.breakdown[estimate.biggest]
    head = (f"estimated peak {total:.1f} GiB per GPU of {gpu_memory_gib:.1f} GiB (at the {estimate.moment}); "
            f"biggest consumer: {estimate.biggest} {share:.1f} GiB")
    if total > gpu_memory_gib * (1 + FIT_TOLERANCE):
        return Finding("error", "memory", f"does not fit: {head}. Fix: {_advice(estimate, settings)}")
    if total > gpu_memory_gib * (1 - FIT_TOLERANCE):
        return Finding("warning", "memory", f"may not fit (within the estimator's ±10%): {head}. "
                                            f"If it runs out of memory: {_advice(estimate, settings)}")
    return Finding("ok", "memory", f"fits: {head}")


# ---------------------------------------------------------------------------------------------
# Environment checks


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_checkpoint_folder(path: str | os.PathLike, needed_bytes: int) -> Finding:
    """The folder (or the nearest existing parent, where it will be created) takes a real file and has
    ``needed_bytes`` free. Nothing is left behind."""
    folder = Path(path)
    where = _existing_ancestor(folder)
    setting = "checkpoint folder (OUTPUT_DIR / checkpoint.folder)"
    if not where.is_dir():
        return Finding("error", "checkpoint", f"{setting} {folder}: {where} is not a folder. Fix: point OUTPUT_DIR "
                                              "at the PVC mount path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".preflight-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        return Finding("error", "checkpoint", f"{setting} {folder} is not writable ({error.strerror} in {where}). "
                                              "Fix: mount a writable PVC at OUTPUT_DIR (readOnly: false) and check "
                                              "its permissions for the container's user (fsGroup)")
    free = shutil.disk_usage(where).free
    if free < needed_bytes:
        return Finding("error", "checkpoint", f"{setting} {folder}: {free / 1e9:.1f} GB free, one checkpoint needs "
                                              f"{needed_bytes / 1e9:.1f} GB. Fix: use a larger PVC, free space, or "
                                              "lower checkpoint.keep_latest_k")
    return Finding("ok", "checkpoint", f"{folder} writable, {free / 1e9:.0f} GB free "
                                       f"(one checkpoint: {needed_bytes / 1e9:.1f} GB)")


def check_dev_shm(path: str = "/dev/shm") -> Finding:
    """A warning when shared memory is Docker's 64 MiB default (or smaller, or missing)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return Finding("warning", "/dev/shm", f"{path} is missing: dataloader workers and NCCL need shared memory. "
                                              "Fix: runai --large-shm, or an emptyDir medium: Memory at /dev/shm")
    size = st.f_blocks * st.f_frsize
    if size <= SHM_DEFAULT_BYTES:
        return Finding("warning", "/dev/shm", f"{path} is {size / 1024**2:.0f} MiB (the container default): NCCL and "
                                              "dataloader workers can fail with bus errors. Fix: runai --large-shm, "
                                              "docker --shm-size=16g, or an emptyDir {medium: Memory} at /dev/shm")
    return Finding("ok", "/dev/shm", f"{size / 1024**3:.1f} GiB")


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
HOST_MEMORY_SHARE = 0.8  # of the limit, for pinned staging; the rest is Python, dataloaders, NCCL


def host_memory_limit(cgroup_files: tuple[str, ...] = CGROUP_LIMITS,
                      meminfo: str = "/proc/meminfo") -> tuple[int | None, str]:
    """The smaller of the container's cgroup memory limit and the node's RAM, and where it came from."""
    found: list[tuple[int, str]] = []
    for path in cgroup_files:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" / a huge number: no limit
            found.append((int(text), f"the container's memory limit ({path})"))
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemTotal:"):
                found.append((int(line.split()[1]) * 1024, "the node's RAM"))
    except (OSError, ValueError, IndexError):
        pass
    return min(found) if found else (None, "unknown")


def check_host_memory(config: Any, params: int, world_size: int, local_ranks: int,
                      limit: tuple[int | None, str] | None = None) -> Finding | None:
    """Pinned checkpoint staging holds each rank's share of the checkpoint in host RAM."""
    from torchtitan_runai.ckpt_perf import wants_pinned_staging

    if not wants_pinned_staging(config.checkpoint):
        return None
    replicas = max(int(config.parallelism.data_parallel_replicate_degree), 1)
    need = CHECKPOINT_BYTES_PER_PARAM * params * replicas / max(world_size, 1) * local_ranks
    limit_bytes, source = limit or host_memory_limit()
    summary = f"pinned checkpoint staging holds {need / 1e9:.1f} GB per node ({local_ranks} ranks)"
    if limit_bytes is None:
        return Finding("ok", "host memory", summary + " (limit unknown)")
    if need > HOST_MEMORY_SHARE * limit_bytes:
        raise_limit = "raise the pod's memory limit, " if "limit" in source else ""
        return Finding("error", "host memory", f"{summary}, more than {HOST_MEMORY_SHARE:.0%} of {source}, "
                                               f"{limit_bytes / 1e9:.1f} GB. Fix: {raise_limit}use more nodes "
                                               "(each rank's share shrinks), or set [checkpoint] async_mode = "
                                               "\"async\" (no pinned memory, longer checkpoint stalls)")
    return Finding("ok", "host memory", f"{summary}, {source}: {limit_bytes / 1e9:.0f} GB")


def check_tokenizer(config: Any, env: Mapping[str, str] | None = None) -> Finding:
    """Present locally or in the Hub cache, or downloadable; never downloads."""
    from torchtitan_runai import assets

    env = os.environ if env is None else env
    hub = getattr(config, "hub", None) or assets.Hub()
    assets_path = config.model.hf_assets_path
    try:
        if assets_path:
            folder = Path(assets_path).expanduser()
            if folder.is_dir() and assets.find_tokenizer_files(folder, hub.tokenizer_format):
                return Finding("ok", "tokenizer", f"in {folder}")
        if not hub.repo_id:
            assets.resolve_tokenizer(assets_path, hub, Path("."))  # raises the usual message
        cache = assets.resolve_cache_dir(hub, config.job.dump_folder)
        if cache.is_dir() and assets._from_cache(hub, cache) is not None:
            return Finding("ok", "tokenizer", f"{hub.repo_id} in the Hub cache {cache}")
    except UserError as error:
        return Finding("error", "tokenizer", error.line())
    offline = any(env.get(k, "").strip().lower() in ("1", "true", "yes", "on")
                  for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if offline or not hub.allow_download:
        setting = "HF_HUB_OFFLINE" if offline else "hub.allow_download = false"
        return Finding("error", "tokenizer", f"{setting}: the tokenizer of {hub.repo_id} is not in the cache {cache}. "
                                             "Fix: stage it (python -m torchtitan_runai.stage --config FILE) or point "
                                             "hub.cache_dir / HF_HUB_CACHE at the staged cache")
    if not env.get("HF_TOKEN"):
        return Finding("warning", "tokenizer", f"will download {hub.repo_id} without HF_TOKEN: gated repos "
                                               "(meta-llama) answer 401. Fix: pass HF_TOKEN from a Secret")
    return Finding("ok", "tokenizer", f"will download {hub.repo_id} into {cache} (HF_TOKEN set)")


# ---------------------------------------------------------------------------------------------
# All of it


def checkpoint_folder_of(config: Any, env: Mapping[str, str]) -> str:
    from torchtitan_runai import storage

    return storage.resolve_storage(env, config.job.dump_folder, config.checkpoint.folder,
                                   config.metrics.save_tb_folder).checkpoint_folder


def model_args_of(config: Any):
    from torchtitan_runai.config import _model_args

    return _model_args(config)


def run_preflight(config: Any, world_size: int, gpu_memory_gib: float | None, dry_run: bool = False,
                  env: Mapping[str, str] | None = None, shm_path: str = "/dev/shm",
                  local_ranks: int | None = None,
                  host_limit: tuple[int | None, str] | None = None) -> list[Finding]:
    """Every check for a parsed config. Machine-dependent errors become warnings in a dry run."""
    from torchtitan_runai.config import check_world_size

    env = os.environ if env is None else env
    findings: list[Finding] = []
    try:
        check_world_size(config, world_size)
        findings.append(Finding("ok", "parallelism", f"degrees tile {world_size} GPU(s)"))
    except UserError as error:
        findings.append(Finding("error", "parallelism", error.line()))
        return findings  # the estimate needs valid degrees
    args = model_args_of(config)
    settings = TrainSettings.from_config(config, world_size)
    estimate = estimate_memory(args, settings)
    memory = gpu_memory_gib if gpu_memory_gib else DEFAULT_GPU_MEMORY_GIB
    fit = check_fit(estimate, memory, settings)
    if not gpu_memory_gib and fit.level != "ok":
        fit = dataclasses.replace(fit, message=fit.message + " (no GPU visible: assumed an H100 80GB; "
                                                             "pass --gpu-memory-gib)")
    machine: list[Finding] = [fit]  # the fit depends on the GPU: a dry run may be elsewhere
    if config.checkpoint.enable:
        machine.append(check_checkpoint_folder(checkpoint_folder_of(config, env),
                                               CHECKPOINT_BYTES_PER_PARAM * estimate.params))
    host = check_host_memory(config, estimate.params, world_size, local_ranks or world_size, host_limit)
    if host is not None:
        machine.append(host)
    machine.append(check_tokenizer(config, env))
    if dry_run:
        machine = [dataclasses.replace(f, level="warning") if f.level == "error" else f for f in machine]
    findings.extend(machine)
    findings.append(check_dev_shm(shm_path))
    findings.append(Finding("info", "estimate", format_estimate(estimate, settings)))
    return findings


def enforce(findings: list[Finding], warn: Callable[[str], None] | None = None) -> None:
    """For the launcher: print every warning through ``warn``; raise the first error as the one
    line a user error gets (printed once, at the CLI edge)."""
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    for f in findings:
        if f.level == "warning":
            warn(f"[preflight] {f.level}: {f.check}: {f.message}")
    error = next((f for f in findings if f.level == "error"), None)
    if error is not None:
        why, _, fix = error.message.partition(" Fix: ")
        raise UserError(f"preflight {error.check}", None, why.rstrip("."), fix or "see the preflight lines above")


def format_estimate(estimate: MemoryEstimate, settings: TrainSettings | None = None) -> str:
    lines = [f"peak memory per GPU at the {estimate.moment} ({estimate.params / 1e9:.2f} B parameters):"]
    for name, gib in sorted(estimate.breakdown.items(), key=lambda kv: -kv[1]):
        if gib > 0.005:
            lines.append(f"  {name:<18} {gib:7.2f} GiB")
    other = "optimizer step" if estimate.moment == "backward start" else "backward start"
    fixed = estimate.breakdown["allocator"] + estimate.breakdown["cuda context"]
    total = f"  {'total':<18} {estimate.total_gib:7.2f} GiB"
    lines.append(f"{total}   (the {other}: {estimate.other_moment_gib + fixed:.2f} GiB)")
    return "\n".join(lines)


def report(findings: list[Finding]) -> str:
    out = []
    for f in findings:
        if f.level == "info":
            out.append(f.message)
        else:
            out.append(f"[{f.level:>7}] {f.check}: {f.message}")
    return "\n".join(out)


def detect_gpu_memory_gib() -> float | None:
    """The smallest GPU's memory, from nvidia-smi: the launcher lives as long as the job, and asking
    torch would create a CUDA context on GPU 0 that the job's rank 0 then pays for."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        mib = [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):  # no driver tools: skip the fit check
        return None
    return min(mib) * 2**20 / GIB if mib else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_runai.preflight", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the TOML recipe")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default: visible GPUs, else 8")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="default: the visible GPU's, else 79.6 (H100 80GB)")
    parser.add_argument("--dry-run", action="store_true", help="machine-dependent problems are warnings")
    args, overrides = parser.parse_known_args(argv)
    for name in ("nodes", "gpus_per_node"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}", value, "must be at least 1", "pass a positive count")
    gpu_memory = args.gpu_memory_gib or detect_gpu_memory_gib()
    gpus = args.gpus_per_node
    if gpus is None:
        gpus = _visible_gpus() or 8
    world_size = args.nodes * gpus
    from torchtitan_runai import config as config_mod

    config = config_mod.parse_job_config(["--job.config_file", args.config, *overrides])
    findings = run_preflight(config, world_size, gpu_memory, dry_run=args.dry_run, local_ranks=gpus)
    print(f"preflight: {args.config}, {args.nodes} node(s) x {gpus} GPU(s)")
    print(report(findings))
    return 2 if any(f.level == "error" for f in findings) else 0


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


# ---------------------------------------------------------------------------------------------
# Shared storage across ranks

MARKER_NAME = ".runai-shared-folder"


def _torch_broadcast(value: str | None) -> str:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def confirm_shared_folder(folder: str | os.PathLike, rank: int, world_size: int, job_key: str,
                          timeout: float = 30.0, broadcast: Callable[[str | None], str] | None = None,
                          poll: float = 0.2) -> None:
    """Every rank sees the checkpoint folder rank 0 writes to, or a UserError (see module doc).

    ``broadcast(value)`` sends rank 0's value to every rank and returns it (it is also the barrier
    after rank 0's write); default: ``torch.distributed.broadcast_object_list`` (the process group
    must be initialized). The others re-read for up to ``timeout`` seconds (NFS attribute caches).
    """
    if world_size <= 1:
        return
    folder = Path(folder)
    marker = folder / MARKER_NAME
    broadcast = broadcast or _torch_broadcast
    nonce = None
    if rank == 0:
        nonce = f"{job_key} {secrets.token_hex(16)}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{MARKER_NAME}.{os.getpid()}.tmp"
        tmp.write_text(nonce)
        os.replace(tmp, marker)
    nonce = broadcast(nonce)
    if rank == 0:
        return
    deadline = time.monotonic() + timeout
    seen = None
    while True:
        try:
            seen = marker.read_text()
        except OSError:
            seen = None
        if seen == nonce or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    if seen != nonce:
        what = "does not exist here" if seen is None else "holds another job's or an older marker"
        raise UserError(
            "checkpoint folder (OUTPUT_DIR)", str(folder),
            f"rank {rank} does not see the marker rank 0 wrote there ({marker} {what}): the ranks write to "
            "different disks, so checkpoints could never be resumed",
            "for a multi-node job, mount one shared ReadWriteMany PVC at OUTPUT_DIR on every pod "
            "(not emptyDir, hostPath or a ReadWriteOnce volume)",
        )


if __name__ == "__main__":
    cli(main, prog="preflight")
