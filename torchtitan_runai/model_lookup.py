"""The one lookup of a config's model: ``model.name`` / ``model.flavor`` → the train spec and its model args.

``model_args(config)`` is what the config check (``job.parse_job_config``), the memory estimate
(``preflight``) and the Hugging Face import (``hf.initial_load``) use; ``lookup(config)`` also
returns the train spec (the Hugging Face export builds the model from it). Both import
``experimental.custom_import`` first (it may add specs and flavors, as torchtitan's Trainer does),
and turn an unknown name or flavor into one ``UserError``. ``check_model`` adds the head-count
check against tensor parallelism, ``check_trainable_spec`` the launcher's refusal of stock's spec.

``model_args`` of our specs and stock ``llama3`` (they share torchtitan's Llama 3 flavor table:
``training.spec.build_train_spec``) reads the table with ``upstream.llama3_flavors``, without
importing the model code: the launcher validates a config in ~1 s instead of ~6 s of imports that
every rank repeats. Any other spec, a ``custom_import``, or a table the reader cannot read takes the
registry (our specs as ``llama3``: ``OUR_SPECS``).
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

from torchtitan_runai import FUSED_TRAIN_SPEC_NAME, TRAIN_SPEC_NAME, upstream
from torchtitan_runai.errors import UserError

STOCK_SPECS = ("llama3",)
"""torchtitan's registered Llama 3 spec, which ours wraps (``training.spec.build_train_spec``)."""

OUR_SPECS = (TRAIN_SPEC_NAME, FUSED_TRAIN_SPEC_NAME)
"""This fork's specs: torchtitan's Llama 3 model and flavors with this fork's components. The ranks
register them (``training.spec``); here they are looked up as ``llama3``, whose model and flavor table
they share (the fused spec's output layer is an ``nn.Linear`` with the same weights), so the checks
and the export need nothing of the ranks' side."""

LLAMA3_TABLE_SPECS = (*OUR_SPECS, *STOCK_SPECS)
"""Specs whose flavors are torchtitan's ``llama3_args`` table."""


def _import_custom_module(config: Any) -> None:
    """``experimental.custom_import`` may register train specs and flavors: torchtitan's Trainer
    imports it before it looks the model up, so the checks here must too."""
    module = getattr(getattr(config, "experimental", None), "custom_import", "")
    if not module:
        return
    upstream.load_torchtitan()  # the module may import torchtitan itself, which must be whole first
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise UserError(
            "experimental.custom_import",
            module,
            f"cannot be imported ({e})",
            "make the module importable from the working directory or PYTHONPATH, or remove the setting",
        )


def _unknown_flavor(config: Any, flavors) -> UserError:
    return UserError(
        "model.flavor", config.model.flavor, f"not a flavor of {config.model.name}", "use one of " + ", ".join(flavors)
    )


def lookup(config: Any) -> tuple["upstream.TrainSpec", Any]:
    """(train spec, a copy of the model args) for ``config.model.name`` / ``.flavor``, as the
    trainer builds them. Raises UserError for an unknown spec or flavor."""
    name, flavor = config.model.name, config.model.flavor
    _import_custom_module(config)
    try:
        spec = upstream.get_train_spec(STOCK_SPECS[0] if name in OUR_SPECS else name)
    except Exception:  # torchtitan raises ValueError/ImportError for unknown names
        raise UserError(
            "model.name",
            name,
            "no such train spec",
            f"use '{TRAIN_SPEC_NAME}' (this fork's Llama 3.1 spec) or '{FUSED_TRAIN_SPEC_NAME}'",
        ) from None
    if flavor not in spec.model_args:
        raise _unknown_flavor(config, spec.model_args)
    return spec, copy.deepcopy(spec.model_args[flavor])


def model_args(config: Any) -> Any:
    """The model args of the config's spec and flavor (see ``lookup``): the field values of
    torchtitan's ``TransformerModelArgs`` for the Llama 3 specs, read as attributes."""
    custom = getattr(getattr(config, "experimental", None), "custom_import", "")
    flavors = upstream.llama3_flavors() if config.model.name in LLAMA3_TABLE_SPECS and not custom else None
    if flavors is None:
        return lookup(config)[1]
    if config.model.flavor not in flavors:
        raise _unknown_flavor(config, flavors)
    return flavors[config.model.flavor]


def check_trainable_spec(config: Any) -> None:
    """The launcher's check that this fork can train ``model.name``. Stock torchtitan's own spec
    lacks the fork's seams (gloo's SUM reduction on CPU, local data, the tokenizer download, the log
    line) and fails in the ranks; a stock checkpoint still exports, so ``check_model`` allows it."""
    name = config.model.name
    if name in STOCK_SPECS:
        raise UserError(
            "model.name",
            name,
            "is stock torchtitan's train spec, which this fork does not train",
            f'use model.name = "{TRAIN_SPEC_NAME}" (the same Llama 3.1 model and flavors, with this '
            "fork's data, tokenizer, CPU and log support)",
        )


def check_model(config: Any) -> Any:
    """The config's model exists and its head counts divide the tensor-parallel degree; returns its args."""
    args = model_args(config)
    tp = config.parallelism.tensor_parallel_degree
    if tp > 1:
        for attr in ("n_heads", "n_kv_heads"):
            heads = getattr(args, attr, None) or args.n_heads
            if heads % tp:
                raise UserError(
                    "parallelism.tensor_parallel_degree",
                    tp,
                    f"does not divide the model's {attr} ({heads})",
                    "use a divisor of it, e.g. 8",
                )
    return args
