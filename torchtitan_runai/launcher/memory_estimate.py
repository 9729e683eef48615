"""The memory estimate: peak GPU memory per rank from the model's shape and the job's settings.

Pure arithmetic (no torch, no GPU): ``preflight`` checks the fit with it, ``bench/memory_estimate.py``
calibrates it, and the 12 bytes per parameter of a full checkpoint (``storage``, the host-memory
check) are stated here once.


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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3


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
        ffn_hidden=ffn_hidden_dim(
            model_args.dim, getattr(model_args, "multiple_of", 256), getattr(model_args, "ffn_dim_multiplier", None)
        ),
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
        parts = {
            "parameters": parameters,
            "gradients": 0.0,
            "optimizer": optimizer,
            "weights in flight": in_flight,
            "activations": activations,
            "logits": logits,
            "comm buffers": comm,
        }
    else:
        parts = {
            "parameters": parameters,
            "gradients": gradients,
            "optimizer": optimizer,
            "weights in flight": 0.0,
            "activations": 0.0,
            "logits": 0.0,
            "comm buffers": comm,
        }
    breakdown = {k: v / GIB for k, v in parts.items()}
    peak = sum(breakdown.values())
    breakdown["allocator"] = ALLOCATOR_FIXED_GIB + ALLOCATOR_FRACTION * peak
    breakdown["cuda context"] = CUDA_CONTEXT_GIB
    other = (step if moment == "backward start" else backward) / GIB
    return MemoryEstimate(breakdown=breakdown, moment=moment, other_moment_gib=other, params=params)


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
