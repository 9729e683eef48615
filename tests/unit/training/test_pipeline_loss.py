"""The pipelined loss (upstream torchtitan issue #2972): the value stays the sum, the gradient is the
non-PP Trainer's ``sum / global_valid_tokens``; refused without the step's count; the spec marks it."""

from __future__ import annotations

import pytest
import torch

from torchtitan_runai.training import loss as loss_mod
from torchtitan_runai.training import spec


def _logits_and_labels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 11, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (2, 8), generator=gen)
    return logits, labels


def test_a_pipelined_loss_keeps_its_value_and_divides_its_gradient_like_the_trainer():
    logits, labels = _logits_and_labels()
    plain = loss_mod.LossFn("plain")
    tokens = torch.tensor(37.0)
    (plain(logits, labels) / tokens).backward()  # torchtitan's non-PP path
    expected = logits.grad.clone()
    logits.grad = None

    pipelined = loss_mod.LossFn("plain")
    pipelined.pipelined = True
    with loss_mod.pipeline_step(pipelined, tokens):
        total = pipelined(logits, labels)
    assert torch.equal(total.detach(), plain(logits, labels).detach())  # the sum the Trainer divides for the log
    total.backward()  # what torch's schedule does
    assert torch.equal(logits.grad, expected)
    assert pipelined.step_tokens is None  # only for the step


def test_the_count_may_be_a_number_once_reduced_over_data_parallel_ranks():
    logits, labels = _logits_and_labels()
    pipelined = loss_mod.LossFn("chunked", chunk_tokens=5)
    pipelined.pipelined = True
    with loss_mod.pipeline_step(pipelined, 16):
        pipelined(logits, labels).backward()
    reference = logits.detach().clone().requires_grad_()
    (loss_mod.LossFn("plain")(reference, labels) / 16).backward()
    torch.testing.assert_close(logits.grad, reference.grad)


def test_a_pipelined_loss_without_the_count_refuses_rather_than_train_wrongly():
    logits, labels = _logits_and_labels()
    pipelined = loss_mod.LossFn()
    pipelined.pipelined = True
    with pytest.raises(RuntimeError, match="valid-token count"):
        pipelined(logits, labels)


def test_a_loss_outside_a_pipeline_is_the_sum_and_pipeline_step_leaves_it_alone():
    logits, labels = _logits_and_labels()
    fn = loss_mod.LossFn()
    with loss_mod.pipeline_step(fn, 3.0):
        assert fn.step_tokens is None
        fn(logits, labels).backward()
    reference = logits.detach().clone().requires_grad_()
    loss_mod.LossFn()(reference, labels).backward()
    assert torch.equal(logits.grad, reference.grad)


def test_the_spec_marks_the_loss_it_hands_to_the_pipeline():
    seen = {}

    def upstream_pipelining(*args):
        seen["args"] = args
        return "schedule"

    fn = loss_mod.LossFn()
    result = spec.pipeline(upstream_pipelining, "model", "dims", "cfg", "dev", "args", "par", fn)
    assert result == "schedule" and seen["args"][-1] is fn and fn.pipelined
    assert spec.build_train_spec().pipelining_fn.args[0] is not None
    with pytest.raises(TypeError):
        spec.pipeline(upstream_pipelining, "model", "dims", "cfg", "dev", "args", "par", lambda p, t: p)
