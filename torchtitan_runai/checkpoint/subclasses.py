"""Reading checkpoints that hold tensor subclasses: torchao's float8 weights.

With float8 training and FSDP's float8 all-gather (``[quantize.linear.float8]
enable_fsdp_float8_all_gather = true``, the 405B recipe's setting), the model's weights are
torchao's ``WeightWithDynamicFloat8CastTensor`` (a wrapper around the real high-precision weight).
DCP writes every tensor with ``torch.save``, so the checkpoint's pickles name that class, and DCP
reads them back with ``torch.load(weights_only=True)``: a process that has not imported torchao
(the export command, a run that loads the checkpoint's weights without float8) fails with
``UnpicklingError ... Unsupported global: torchao.float8.fsdp_utils.WeightWithDynamicFloat8CastTensor``.
torchao allow-lists its own classes for ``weights_only`` loads when ``torchao.float8`` is imported
(``torch.serialization.add_safe_globals``), and the loaded wrapper copies into a plain tensor as the
weight it wraps; so importing it before the load is the whole fix (``allow_torchao``).

On the ranks torchtitan's own load does the reading: ``allow_on_ranks`` imports torchao before it
when the run reads a DCP checkpoint (an initial load, or a resume) without configuring float8
itself (a float8 run imports torchao anyway).

``load_allowing_torchao`` runs a load and, only if it failed on a torchao class, imports torchao
and runs it again: a checkpoint without float8 never pays torchao's import (seconds, and warnings
about its GPU kernels on a CPU machine). Without torchao installed it is one line naming the fix.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, TypeVar

from torchtitan_runai import storage
from torchtitan_runai.checkpoint import folder
from torchtitan_runai.errors import UserError

T = TypeVar("T")
TORCHAO_GLOBAL = "torchao."
"""How a torchao class appears in torch's weights-only refusal (``GLOBAL torchao.float8...``)."""


def names_torchao(error: BaseException) -> bool:
    """Whether a failed load refused a torchao class (DCP wraps the reader's error in its own)."""
    text = str(error)
    return TORCHAO_GLOBAL in text and ("weights_only" in text or "Unsupported global" in text)


def allow_torchao() -> bool:
    """Import ``torchao.float8`` when installed (it allow-lists its tensor classes for weights-only
    loads); whether it is installed."""
    if importlib.util.find_spec("torchao") is None:
        return False
    importlib.import_module("torchao.float8")
    return True


def allow_on_ranks(job_config: Any) -> bool:
    """Before the trainer loads: torchao's classes allowed when a DCP checkpoint may be read by a run
    without float8 (``checkpoint.initial_load_path`` of a DCP folder, or a resume); whether torchao
    was imported."""
    ckpt = job_config.checkpoint
    if not ckpt.enable or any("float8" in c for c in job_config.model.converters):
        return False
    dcp_initial_load = bool(ckpt.initial_load_path) and not ckpt.initial_load_in_hf
    if not dcp_initial_load and not folder.step_folders(storage.checkpoint_dir(job_config)):
        return False
    return allow_torchao()


def load_allowing_torchao(load: Callable[[], T], setting: str, path: str) -> T:
    """``load()``; if it refused a torchao class, ``load()`` again with torchao's classes allowed."""
    try:
        return load()
    except BaseException as error:  # DCP's CheckpointException is a BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit)) or not names_torchao(error):
            raise
        if not allow_torchao():
            raise UserError(
                setting,
                path,
                "the checkpoint holds torchao float8 weights (float8 training) and torchao is not installed",
                "pip install torchao (the training image has it), then run this again",
            ) from None
    return load()
