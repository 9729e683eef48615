"""The fork's loss: cross-entropy over flattened logits, in torchtitan's contract, plus faster paths.

The original example project patched torchtitan's train loop to reshape logits ``[B, S, V] -> [B*S, V]`` and labels
``[B, S] -> [B*S]`` before the loss. Here that lives in the train spec's ``build_loss_fn`` instead.
The contract with torchtitan 0.2.2's Trainer is unchanged: the function returns the *sum* of the
per-token losses, positions labelled ``IGNORE_INDEX`` contribute nothing, and the Trainer divides
by the global count of valid tokens across data-parallel ranks and microbatches.

Variants (``[perf] loss``, see ``config.Perf``); all return the same value and gradients up to rounding
(tests/unit/training/test_loss.py checks each against a direct fp64 reference, ignored positions included):

* ``plain``: torchtitan's own ``cross_entropy_loss`` (``F.cross_entropy`` on the full logits upcast to
  fp32): stock behaviour.
* ``chunked``: the same on slices of the logits, each slice's fp32 copy recomputed in backward
  instead of kept, so eager mode never holds fp32 logits. The bf16 logits still exist.
* ``fused``: (memory lever, not a speed lever: see ``config.Perf.loss``) the model's output layer hands over hidden
  states and weight (see
  ``torchtitan_runai.training.fused_head``) and the loss computes logits, loss and gradients chunk by chunk:
  neither the logits nor their gradient ever exist in full. Needs the model class
  ``FusedHeadTransformer``; if the model returns plain logits the loss falls back to ``plain``.

Pipeline parallel (upstream torchtitan issue #2972). Without PP the Trainer divides the summed loss
by the step's global count of valid tokens *before* ``backward``. With PP, torchtitan 0.2.2 hands
this function to torch's pipeline schedule (``scale_grads=False``), which runs ``backward`` on what
it returns, the raw sum: every gradient came out ``global_valid_tokens`` times too large (956 vs
1.74 ``grad_norm`` on the debug model), and only the logged value was divided. Clipping at
``max_norm`` hid it while the true norm was above the limit. ``spec.pipeline`` marks the loss
``pipelined``; the trainer then gives it each step's count (``pipeline_step``) and the loss keeps
its value (the sum the Trainer divides for the log) but divides its gradient by the count
(``ScaledGrad``), so the gradients equal the non-PP ones up to the order of the sums. And only the
last stage computes a loss: the other stages' Trainer returns -1, which is what rank 0 (a first
stage) logged; ``last_stage_loss`` gives every stage the last stage's value.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from torchtitan_runai.config import LOSS_CHUNK_TOKENS as DEFAULT_CHUNK_TOKENS
from torchtitan_runai.training.fused_head import (
    HeadInput,
    ce_sum_and_grad,
    fused_linear_cross_entropy,
)
from torchtitan_runai.upstream import IGNORE_INDEX, JobConfig, cross_entropy_loss, logger

LOSS_VARIANTS = ("plain", "chunked", "fused")


def _chunk_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=IGNORE_INDEX)


def chunked_cross_entropy(
    pred: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """torchtitan's ``cross_entropy_loss`` over row slices; each slice's fp32 copy is recomputed in backward."""
    vocab = pred.shape[-1]
    flat, flat_labels = pred.reshape(-1, vocab), labels.reshape(-1)
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_ce, flat[rows], flat_labels[rows], use_reentrant=False)
    return total


def _as_logits(pred) -> torch.Tensor:
    """Logits from whatever the model returned (a ``HeadInput`` is projected here, unchunked)."""
    if isinstance(pred, HeadInput):
        return F.linear(pred.hidden, pred.weight)
    return pred


class ScaledGrad(torch.autograd.Function):
    """``total`` unchanged in forward; its gradient divided by ``denominator`` in backward.

    A division rather than a multiplication by ``1 / denominator``: the same rounding as the
    Trainer's ``loss_sum / global_valid_tokens`` without PP."""

    @staticmethod
    def forward(ctx, total: torch.Tensor, denominator) -> torch.Tensor:
        ctx.denominator = denominator
        return total.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad / ctx.denominator, None


class LossFn:
    """The callable handed to torchtitan: ``loss_fn(pred, labels) -> sum of token losses``.

    ``pipelined`` (set by ``spec.pipeline``): the loss runs inside torch's pipeline schedule, which
    calls ``backward`` on it directly; its gradient is then divided by the step's global count of
    valid tokens (``pipeline_step``), see the module docstring.
    """

    def __init__(
        self,
        variant: str = "plain",
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        ce_fn=None,
        plain_fn=None,
    ):
        if variant not in LOSS_VARIANTS:
            raise ValueError(f"unknown loss variant {variant!r}; expected one of {LOSS_VARIANTS}")
        if chunk_tokens <= 0:
            raise ValueError(f"loss_chunk_tokens must be positive, got {chunk_tokens}")
        self.variant, self.chunk_tokens = variant, chunk_tokens
        self.ce_fn = ce_fn or ce_sum_and_grad
        self.plain_fn = plain_fn or cross_entropy_loss
        self.pipelined = False
        self.step_tokens = None  # the step's global valid-token count, while pipeline_step holds it

    def __call__(self, pred, labels: torch.Tensor) -> torch.Tensor:
        total = self._sum(pred, labels)
        if not self.pipelined:
            return total
        if self.step_tokens is None:
            # A trainer that does not give the count (torchtitan's own) would train with gradients
            # scaled by the token count: refuse rather than train wrongly.
            raise RuntimeError(
                "the pipelined loss needs the step's global valid-token count "
                "(training.loss.pipeline_step, called by RunaiTrainer.forward_backward_step)"
            )
        return ScaledGrad.apply(total, self.step_tokens)

    def _sum(self, pred, labels: torch.Tensor) -> torch.Tensor:
        if self.variant == "fused" and isinstance(pred, HeadInput):
            return fused_linear_cross_entropy(pred, labels, chunk_tokens=self.chunk_tokens, ce_fn=self.ce_fn)
        logits = _as_logits(pred)
        if self.variant == "chunked":
            return chunked_cross_entropy(logits, labels, self.chunk_tokens)
        return self.plain_fn(logits, labels)


@contextmanager
def pipeline_step(loss_fn, global_valid_tokens):
    """While the pipeline schedule runs one microbatch of the step: the pipelined loss divides its
    gradient by ``global_valid_tokens`` (the Trainer's count: a tensor, or a number once reduced
    over data-parallel ranks). A loss that is not pipelined is left alone."""
    if not getattr(loss_fn, "pipelined", False):
        yield
        return
    loss_fn.step_tokens = global_valid_tokens
    try:
        yield
    finally:
        loss_fn.step_tokens = None


def last_stage_loss(loss: torch.Tensor, has_last_stage: bool, pp_group) -> torch.Tensor:
    """The last pipeline stage's loss on every rank of its pipeline (``pp_group``).

    torchtitan returns -1 on the ranks without the last stage and logs rank 0's value, so a PP job's
    default log showed ``loss: -1.00000``. One scalar all-reduce per microbatch: exactly one rank of
    a pipeline holds the last stage (for V schedules, the first rank), the others add 0. After it the
    Trainer's data-parallel reduction and the step trace see the real loss on every rank.
    """
    import torch.distributed as dist

    if has_last_stage:
        value = loss.detach().reshape(()).to(torch.float32).clone()
    else:
        value = torch.zeros((), dtype=torch.float32, device=loss.device)
    dist.all_reduce(value, group=pp_group)
    return value


def build_loss_fn(job_config: JobConfig, **kwargs):
    """TrainSpec.build_loss_fn: the variant chosen by ``[perf] loss`` (plain if no such section).

    With ``compile.enable`` and "loss" in ``compile.components``: the plain loss is compiled whole
    (stock behaviour); the fused loss compiles only its per-chunk elementwise kernel (the matmuls
    are cuBLAS either way, and a Python loop over chunks should not be traced).
    """
    del kwargs
    perf = getattr(job_config, "perf", None)
    variant = getattr(perf, "loss", "plain")
    chunk_tokens = getattr(perf, "loss_chunk_tokens", DEFAULT_CHUNK_TOKENS)
    return build_loss(variant, chunk_tokens, job_config)


def build_loss(variant: str, chunk_tokens: int, job_config: JobConfig) -> LossFn:
    compile_loss = job_config.compile.enable and "loss" in job_config.compile.components
    ce_fn, plain_fn = ce_sum_and_grad, cross_entropy_loss
    if compile_loss:
        logger.debug(f"Compiling the loss function ({variant}) with torch.compile")
        compile_ = partial(torch.compile, backend=job_config.compile.backend)
        ce_fn, plain_fn = compile_(ce_sum_and_grad), compile_(cross_entropy_loss)
    logger.debug(f"Loss: {variant} cross-entropy (chunk {chunk_tokens} tokens)")
    return LossFn(variant, chunk_tokens, ce_fn=ce_fn, plain_fn=plain_fn)
