"""Our train spec, ``llama3_runai``, and the one lookup of a config's model: spec + flavor → model args.

``model_args(config)`` is what the config check (``job.parse_job_config``), the memory estimate
(``preflight``) and the Hugging Face export and import (``hf``) all use: it registers our specs,
imports ``experimental.custom_import`` first (it may add specs and flavors, as torchtitan's Trainer
does), and turns an unknown name or flavor into one ``UserError``. ``check_model`` adds the
head-count check against tensor parallelism.

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
  memory/MFU reported as n/a on CPU (``training.logs``);
- ``parallelize_fn``: torchtitan's ``parallelize_llama``, then, on gloo (CPU), FSDP told to
  reduce gradients by SUM (``device.force_sum_reduction``), since gloo has no AVG.

Importing this module registers the specs (Python imports a module once per process).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from typing import Any

from torchtitan_runai import FUSED_TRAIN_SPEC_NAME, TRAIN_SPEC_NAME, upstream
from torchtitan_runai.errors import UserError
from torchtitan_runai.training import data, device, fused_head, logs, loss, tokenizer


def parallelize(model, parallel_dims, job_config):
    model = upstream.llama3.parallelize_llama(model, parallel_dims, job_config)
    if device.uses_gloo():
        device.force_sum_reduction(model)
    return model


def build_train_spec() -> "upstream.TrainSpec":
    return dataclasses.replace(
        upstream.llama3.get_train_spec(),
        parallelize_fn=parallelize,
        build_loss_fn=loss.build_loss_fn,
        build_tokenizer_fn=tokenizer.build_tokenizer,
        build_dataloader_fn=data.build_dataloader,
        build_metrics_processor_fn=logs.build_metrics_processor,
    )


def build_fused_train_spec() -> "upstream.TrainSpec":
    """``llama3_runai_fused``: same, but the output layer hands its input to the loss in training,
    so ``[perf] loss = "fused"`` never materialises the [tokens, vocab] logits (a memory lever:
    4-8 GiB less peak on the 8B proxy, 1-2% slower; bench/results). Not for TP/PP."""
    return dataclasses.replace(build_train_spec(), model_cls=fused_head.FusedHeadTransformer)


upstream.register_train_spec(TRAIN_SPEC_NAME, build_train_spec())
upstream.register_train_spec(FUSED_TRAIN_SPEC_NAME, build_fused_train_spec())



# ---------------------------------------------------------------------------------------------
# The one lookup: model.name / model.flavor -> the spec and its model args


def _import_custom_module(config: Any) -> None:
    """``experimental.custom_import`` may register train specs and flavors: torchtitan's Trainer
    imports it before it looks the model up, so the checks here must too."""
    module = getattr(getattr(config, "experimental", None), "custom_import", "")
    if not module:
        return
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise UserError("experimental.custom_import", module, f"cannot be imported ({e})",
                        "make the module importable from the working directory or PYTHONPATH, or remove the setting")


def lookup(config: Any) -> tuple["upstream.TrainSpec", Any]:
    """(train spec, a copy of the model args) for ``config.model.name`` / ``.flavor``, as the
    trainer builds them. Raises UserError for an unknown spec or flavor."""
    name, flavor = config.model.name, config.model.flavor
    _import_custom_module(config)
    try:
        spec = upstream.get_train_spec(name)
    except Exception:  # torchtitan raises ValueError/ImportError for unknown names
        raise UserError("model.name", name, "no such train spec",
                        f"use '{TRAIN_SPEC_NAME}' (this fork's Llama 3.1 spec) or '{FUSED_TRAIN_SPEC_NAME}'") from None
    if flavor not in spec.model_args:
        raise UserError("model.flavor", flavor, f"not a flavor of {name}", "use one of " + ", ".join(spec.model_args))
    return spec, copy.deepcopy(spec.model_args[flavor])


def model_args(config: Any) -> Any:
    """The model args of the config's spec and flavor (see ``lookup``)."""
    return lookup(config)[1]


STOCK_SPECS = ("llama3",)
"""torchtitan's registered Llama 3 spec, which ours wraps (``build_train_spec``)."""


def check_trainable_spec(config: Any) -> None:
    """The launcher's check that this fork can train ``model.name``. Stock torchtitan's own spec
    lacks the fork's seams (gloo's SUM reduction on CPU, local data, the tokenizer download, the log
    line) and fails in the ranks; a stock checkpoint still exports, so ``check_model`` allows it."""
    name = config.model.name
    if name in STOCK_SPECS:
        raise UserError("model.name", name, "is stock torchtitan's train spec, which this fork does not train",
                        f'use model.name = "{TRAIN_SPEC_NAME}" (the same Llama 3.1 model and flavors, with this '
                        "fork's data, tokenizer, CPU and log support)")


def check_model(config: Any) -> Any:
    """The config's model exists and its head counts divide the tensor-parallel degree; returns its args."""
    args = model_args(config)
    tp = config.parallelism.tensor_parallel_degree
    if tp > 1:
        for attr in ("n_heads", "n_kv_heads"):
            heads = getattr(args, attr, None) or args.n_heads
            if heads % tp:
                raise UserError("parallelism.tensor_parallel_degree", tp,
                                f"does not divide the model's {attr} ({heads})", "use a divisor of it, e.g. 8")
    return args
