"""Every loss variant equals a direct fp64 reference: values and gradients, ignored positions too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from torchtitan_runai.config import Perf
from torchtitan_runai.training import loss as loss_mod
from torchtitan_runai.training.fused_head import (
    FusedHeadTransformer,
    FusedLMHead,
    HeadInput,
    ce_sum_and_grad,
    fused_linear_cross_entropy,
)
from torchtitan_runai.upstream import IGNORE_INDEX, llama3

B, S, D, V = 2, 24, 16, 50


def _reference(hidden, weight, labels):
    """Direct fp64 cross-entropy sum, written out (no F.cross_entropy), skipping IGNORE_INDEX."""
    logits = hidden.double().reshape(-1, D) @ weight.double().t()
    flat = labels.reshape(-1)
    keep = flat != IGNORE_INDEX
    logp = logits[keep] - torch.logsumexp(logits[keep], dim=-1, keepdim=True)
    return -logp.gather(1, flat[keep].unsqueeze(1)).sum()


def _inputs(seed, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.3
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[torch.rand(B, S, generator=g) < ignore_frac] = IGNORE_INDEX
    return hidden, weight, labels


def _grads(fn, hidden, weight, labels):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fn(h, w, labels)
    (out * 0.37).backward()  # a non-unit upstream gradient, like 1/global_valid_tokens
    return out.detach(), h.grad, w.grad


VARIANTS = {
    "plain": lambda h, w, y: loss_mod.LossFn("plain")(h @ w.t(), y),
    "chunked": lambda h, w, y: loss_mod.LossFn("chunked", chunk_tokens=7)(h @ w.t(), y),
    "fused": lambda h, w, y: loss_mod.LossFn("fused", chunk_tokens=7)(HeadInput(h, w), y),
    "fused_one_chunk": lambda h, w, y: loss_mod.LossFn("fused", chunk_tokens=4096)(HeadInput(h, w), y),
    # the model handed over hidden+weight but the config asks for a logits-based variant
    "plain_from_head": lambda h, w, y: loss_mod.LossFn("plain")(HeadInput(h, w), y),
    "chunked_from_head": lambda h, w, y: loss_mod.LossFn("chunked", 5)(HeadInput(h, w), y),
    # the config asks for fused but the model returned logits: falls back to plain
    "fused_given_logits": lambda h, w, y: loss_mod.LossFn("fused")(h @ w.t(), y),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_variant_matches_reference(variant, seed):
    hidden, weight, labels = _inputs(seed)
    ref, ref_h, ref_w = _grads(_reference, hidden.double(), weight.double(), labels)
    val, gh, gw = _grads(VARIANTS[variant], hidden, weight, labels)
    torch.testing.assert_close(val.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), ref_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), ref_w, rtol=1e-4, atol=1e-6)


def test_ignored_positions_get_no_gradient_and_no_loss():
    hidden, weight, labels = _inputs(3, ignore_frac=0.0)
    labels[0, :10] = IGNORE_INDEX
    for name in ("plain", "chunked", "fused"):
        val, gh, _ = _grads(VARIANTS[name], hidden, weight, labels)
        assert torch.count_nonzero(gh[0, :10]) == 0, name
        trimmed = _reference(hidden.double(), weight.double(), labels)
        torch.testing.assert_close(val.double(), trimmed, rtol=1e-5, atol=1e-5)


def test_all_ignored_is_zero_with_zero_gradients():
    hidden, weight, labels = _inputs(4)
    labels[:] = IGNORE_INDEX
    val, gh, gw = _grads(VARIANTS["fused"], hidden, weight, labels)
    assert val.item() == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_ce_sum_and_grad_matches_autograd():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (9,), generator=g)
    labels[2] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)
    ref.backward()
    val, grad = ce_sum_and_grad(logits.detach(), labels)
    torch.testing.assert_close(val.double(), ref.detach())
    torch.testing.assert_close(grad.double(), logits.grad, rtol=1e-5, atol=1e-6)


def test_fused_under_bf16_autocast_matches_plain_autocast():
    """Mixed precision as torchtitan runs it on one device: fp32 master weights under autocast."""
    hidden, weight, labels = _inputs(6)
    out = {}
    for name in ("plain", "fused"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn = (
                (lambda h, w, y: loss_mod.LossFn("plain")(torch.nn.functional.linear(h, w), y))
                if name == "plain"
                else VARIANTS["fused"]
            )
            val, gh, gw = _grads(fn, hidden, weight, labels)
        assert gw.dtype == torch.float32  # reaches the fp32 master weight through the cast
        out[name] = (val, gh, gw)
    for a, b in zip(out["plain"], out["fused"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_fused_rejects_bad_chunk():
    hidden, weight, labels = _inputs(7)
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(HeadInput(hidden, weight), labels, chunk_tokens=0)
    with pytest.raises(ValueError):
        loss_mod.LossFn("nope")


def test_fused_head_returns_logits_in_eval_and_handle_in_training():
    head = FusedLMHead(D, V, bias=False)
    x = torch.randn(2, 3, D)
    assert isinstance(head(x), HeadInput)
    with torch.no_grad():
        assert head(x).shape == (2, 3, V)
    head.eval()
    assert head(x).shape == (2, 3, V)


def test_fused_model_trains_like_stock_model():
    """Same weights, same batch: FusedHeadTransformer + fused loss == stock Transformer + plain."""
    args = llama3.TransformerModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64)
    torch.manual_seed(0)
    stock = llama3.Transformer(args)
    with torch.no_grad():
        stock.init_weights()
    fused = FusedHeadTransformer(args)
    assert set(fused.state_dict()) == set(stock.state_dict())  # checkpoint compatible
    fused.load_state_dict(stock.state_dict())
    tokens = torch.randint(0, 64, (2, 16))
    labels = torch.randint(0, 64, (2, 16))
    labels[:, :3] = IGNORE_INDEX
    results = []
    for model, fn in ((stock, loss_mod.LossFn("plain")), (fused, loss_mod.LossFn("fused", 5))):
        model.train()
        model.zero_grad()
        loss = fn(model(tokens), labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    fused.eval()
    with torch.no_grad():
        assert fused(tokens).shape == (2, 16, 64)


def _job(compile_enable=False, perf=None):
    return SimpleNamespace(
        compile=SimpleNamespace(enable=compile_enable, components=["model", "loss"], backend="inductor"),
        perf=perf,
    )


def test_build_loss_fn_picks_variant_from_perf_section():
    assert loss_mod.build_loss_fn(_job()).variant == "plain"  # no [perf] section: stock loss
    built = loss_mod.build_loss_fn(_job(perf=Perf(loss="fused", loss_chunk_tokens=123)))
    assert (built.variant, built.chunk_tokens) == ("fused", 123)
    assert Perf().loss == "plain"  # measured fastest on the H100 proxy
