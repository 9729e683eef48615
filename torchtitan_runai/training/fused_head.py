"""Fused output projection + cross-entropy: the loss without the ``[tokens, 128k]`` logits.

Why: Llama 3's vocabulary has 128,256 entries. For one 8,192-token sequence the logits are 2 GiB in
bf16, their gradient another 2 GiB, and the plain loss upcasts them to fp32 (4 GiB more unless
compiled away). That memory is what forces activation checkpointing or a smaller batch on a GPU
that is otherwise big enough; this module never holds more than one chunk of logits.

How it plugs into torchtitan 0.2.2 without touching its train loop:

* ``FusedHeadTransformer`` is torchtitan's llama3 ``Transformer`` whose ``output`` layer is a
  ``FusedLMHead``. In training (``module.training`` and grad enabled) that layer does not multiply:
  it returns ``HeadInput(hidden, weight)``. In eval/no-grad it is an ordinary ``nn.Linear``
  (validation, generation and export see logits). Parameter names and shapes are unchanged, so
  checkpoints are interchangeable with stock llama3.
* The Trainer then calls ``loss_fn(pred, labels)`` with that ``HeadInput``; ``torchtitan_runai.training.loss``
  recognises it and calls ``fused_linear_cross_entropy``.
* The output layer *is called* as a module, once, so FSDP2's hooks on the ``[norm, output]`` group
  fire as usual: the weight handed out is the unsharded one, and its gradient flows back through
  the group's normal post-backward (reduce-scatter) path.

``fused_linear_cross_entropy`` is a custom autograd Function that, in its forward, walks the
tokens in chunks: logits of the chunk (one matmul), loss sum and d(loss)/d(logits) of the chunk
(one fused elementwise pass, compiled on GPU), then grad_hidden of the chunk and the running
grad_weight (two matmuls). Backward only scales those by the incoming scalar. Matmul FLOPs equal
the plain path; the peak extra memory is one chunk of logits plus its gradient.

Limits: not for pipeline parallelism (a PP stage must output a tensor) nor tensor parallelism with
loss parallel; the float8 converter must skip the output layer (``filter_fqns = ["output"]``,
which torchtitan's recipes already do).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from torchtitan_runai.config import LOSS_CHUNK_TOKENS as DEFAULT_CHUNK_TOKENS
from torchtitan_runai.upstream import IGNORE_INDEX, llama3


class HeadInput(NamedTuple):
    """What the output layer hands to the loss in fused mode: normed hidden states and weight."""

    hidden: torch.Tensor  # [..., dim]
    weight: torch.Tensor  # [vocab, dim]


class FusedLMHead(nn.Linear):
    """``nn.Linear`` that, while training with grad, defers its matmul to the loss."""

    def forward(self, x: torch.Tensor):  # type: ignore[override]
        if self.training and torch.is_grad_enabled():
            return HeadInput(x, self.weight)
        return super().forward(x)


class FusedHeadTransformer(llama3.Transformer):
    """llama3 ``Transformer`` whose output layer is a ``FusedLMHead`` (same parameters)."""

    def __init__(self, model_args):
        super().__init__(model_args)
        if self.output is not None:
            self.output = FusedLMHead(model_args.dim, model_args.vocab_size, bias=False)


def ce_sum_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies of one chunk and d(sum)/d(logits), in fp32 math.

    Positions labelled ``IGNORE_INDEX`` contribute neither loss nor gradient. The gradient is
    returned in the logits' dtype (bf16 under mixed precision, as the plain path produces).
    """
    x = logits.float()
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0).unsqueeze(1)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    loss = ((lse.squeeze(1) - x.gather(1, safe).squeeze(1)) * valid).sum()
    probs = torch.exp(x - lse)
    onehot = torch.zeros_like(probs).scatter_(1, safe, 1.0)
    grad = (probs - onehot) * valid.unsqueeze(1)
    return loss, grad.to(logits.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, ce_fn):
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        # accumulate the weight gradient across chunks in fp32, round once at the end
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_tokens):
            h = hidden[start : start + chunk_tokens]
            logits = h @ weight.t()
            chunk_loss, grad_logits = ce_fn(logits, labels[start : start + chunk_tokens])
            del logits
            loss += chunk_loss
            grad_hidden[start : start + chunk_tokens] = grad_logits @ weight
            grad_weight += (grad_logits.t() @ h).float()
            del grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.to(grad_hidden.dtype)
        return grad_hidden * scale, grad_weight * grad_loss.to(grad_weight.dtype), None, None, None


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def fused_linear_cross_entropy(
    head: HeadInput,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ce_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = ce_sum_and_grad,
) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T`` against ``labels``, chunked.

    Equal (values and gradients, up to rounding) to the plain loss on the full logits. Under
    autocast the hidden states and weight are cast to the autocast dtype first, exactly as
    ``nn.Linear`` would, so gradients reach fp32 master weights through the usual cast.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    dtype = _compute_dtype(head.hidden)
    hidden = head.hidden.reshape(-1, head.hidden.shape[-1]).to(dtype)
    weight = head.weight.to(dtype)
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels.reshape(-1), chunk_tokens, ce_fn)
