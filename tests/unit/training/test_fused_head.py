"""torchtitan_runai.training.fused_head: a drop-in llama3 model whose output layer feeds the loss."""

from __future__ import annotations

import pytest
import torch

from torchtitan_runai.training.fused_head import FusedHeadTransformer, HeadInput, fused_linear_cross_entropy
from torchtitan_runai.upstream import IGNORE_INDEX, llama3


def test_checkpoints_are_interchangeable_with_stock_llama3():
    args = llama3.llama3_args["debugmodel"]
    with torch.device("meta"):
        fused, stock = FusedHeadTransformer(args), llama3.Transformer(args)
    ours = {k: tuple(v.shape) for k, v in fused.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    assert isinstance(fused.output, torch.nn.Linear)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_the_chunk_size_changes_nothing(chunk):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (2, 20), generator=g)
    labels[0, :5] = IGNORE_INDEX
    loss = fused_linear_cross_entropy(HeadInput(hidden, weight), labels, chunk_tokens=chunk)
    loss.backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(
        (h2 @ w2.t()).reshape(-1, 30), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    expected.backward()
    tol = dict(atol=1e-5, rtol=1e-5)  # computed in fp32 whatever the input dtype
    torch.testing.assert_close(loss.double(), expected, **tol)
    torch.testing.assert_close(hidden.grad, h2.grad, **tol)
    torch.testing.assert_close(weight.grad, w2.grad, **tol)
