"""Our train specs, ``llama3_runai`` and ``llama3_runai_fused`` (the lookup of a config's model:
``model_lookup``).

Our spec is ``llama3_runai``: torchtitan's Llama 3 with the fork's changes plugged in.

It is registered under its own name (``model.name = "llama3_runai"`` in our configs) and leaves
torchtitan's ``llama3`` untouched. Relative to ``llama3`` it changes:

- ``build_loss_fn``: the reshaped cross-entropy of ``training.loss`` (the original example's third
  patch, the logits/labels reshape, lives there, as the train spec's loss_fn: its second patch);
- ``build_tokenizer_fn``: the Hugging Face or tiktoken tokenizer, downloaded once per node when
  missing (``training.tokenizer``);
- ``build_dataloader_fn``: torchtitan's text dataloader plus local/PVC files and a retrying C4
  stream (``training.data``);
- ``build_metrics_processor_fn``: torchtitan's step line plus an ETA, no colours off a terminal,
  memory/MFU reported as n/a on CPU (``training.metrics``);
- ``parallelize_fn``: torchtitan's ``parallelize_llama``, then, on gloo (CPU), FSDP told to
  reduce gradients by SUM (``device.force_sum_reduction``), since gloo has no AVG;
- ``pipelining_fn``: torchtitan's ``pipeline_llm`` with the loss marked ``pipelined``
  (``pipeline``): torch's schedule runs backward on the loss itself, so the loss divides its gradient
  by the step's token count (upstream torchtitan issue #2972; ``training.loss``).

Importing this module registers the specs (Python imports a module once per process).
"""

from __future__ import annotations

import dataclasses
from functools import partial

from torchtitan_runai import FUSED_TRAIN_SPEC_NAME, TRAIN_SPEC_NAME, upstream
from torchtitan_runai.training import data, device, fused_head, loss, metrics, tokenizer


def parallelize(model, parallel_dims, job_config):
    model = upstream.llama3.parallelize_llama(model, parallel_dims, job_config)
    if device.uses_gloo():
        device.force_sum_reduction(model)
    return model


def pipeline(upstream_pipelining_fn, model, parallel_dims, job_config, device_, model_args, parallelize_fn, loss_fn):
    """torchtitan's pipelining with a loss whose gradient is divided by the step's token count.

    torchtitan 0.2.2 passes ``loss_fn`` to torch's schedule (``scale_grads=False``), which calls
    ``backward`` on the *sum* of token losses; without PP the Trainer divides by the global valid-token
    count first. Upstream torchtitan issue #2972: PP's gradients (and ``grad_norm``) were that count
    times too large. Marked ``pipelined``, our ``LossFn`` keeps the value and scales the gradient
    (``loss.pipeline_step``, entered by ``RunaiTrainer.forward_backward_step``)."""
    if not isinstance(loss_fn, loss.LossFn):
        raise TypeError(f"pipeline parallel needs training.loss.LossFn as the loss, got {type(loss_fn).__name__}")
    loss_fn.pipelined = True
    return upstream_pipelining_fn(model, parallel_dims, job_config, device_, model_args, parallelize_fn, loss_fn)


def build_train_spec() -> "upstream.TrainSpec":
    stock = upstream.llama3.get_train_spec()
    return dataclasses.replace(
        stock,
        parallelize_fn=parallelize,
        pipelining_fn=partial(pipeline, stock.pipelining_fn),
        build_loss_fn=loss.build_loss_fn,
        build_tokenizer_fn=tokenizer.build_tokenizer,
        build_dataloader_fn=data.build_dataloader,
        build_metrics_processor_fn=metrics.build_metrics_processor,
    )


def build_fused_train_spec() -> "upstream.TrainSpec":
    """``llama3_runai_fused``: same, but the output layer hands its input to the loss in training,
    so ``[perf] loss = "fused"`` never materialises the [tokens, vocab] logits (a memory lever:
    4-8 GiB less peak on the 8B proxy, 1-2% slower; bench/results). Not for TP/PP."""
    return dataclasses.replace(build_train_spec(), model_cls=fused_head.FusedHeadTransformer)


upstream.register_train_spec(TRAIN_SPEC_NAME, build_train_spec())
upstream.register_train_spec(FUSED_TRAIN_SPEC_NAME, build_fused_train_spec())
