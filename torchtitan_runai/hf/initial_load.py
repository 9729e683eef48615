"""Continued pretraining from Hugging Face Llama weights (the initial load).

torchtitan 0.2.2 already knows how: on a job's *first* start (its checkpoint folder does not exist
yet) ``CheckpointManager.load`` reads ``checkpoint.initial_load_path`` as Hugging Face safetensors
when ``checkpoint.initial_load_in_hf = true``, converting names and the q/k permutation with the
train spec's ``state_dict_adapter`` (``Llama3StateDictAdapter.from_hf``; our spec sets it). Only
the model is loaded; optimizer, LR schedule and data position start fresh, and from then on the
job saves and resumes its own checkpoints as usual (a restart never goes back to the HF weights)::

    [model]
    flavor = "8B"                                   # must match the HF config.json
    hf_assets_path = "./assets/hf/Llama-3.1-8B"     # tokenizer

    [checkpoint]
    enable = true
    initial_load_path = "/mnt/models/Llama-3.1-8B"  # folder with *.safetensors
    initial_load_in_hf = true
    initial_load_model_only = true                  # torchtitan's default; required for HF

The folder is read by ``torch.distributed.checkpoint.HuggingFaceStorageReader``: every
``*.safetensors`` directly inside it (the index file is not needed); bf16 weights are converted to
the training dtype while reading. When ``initial_load_path`` is empty torchtitan falls back to
``model.hf_assets_path``. A folder written by ``python -m torchtitan_runai.export`` works, which
is how the round trip is tested.

torchtitan checks none of this up front: a wrong flavor shows up as a size-mismatch traceback on
every rank after the model is built. ``validate_hf_import`` (called from the whole-config
validation, ``job.parse_job_config``, before any worker starts) compares the folder's ``config.json`` with the
configured flavor and reports the first difference as one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchtitan_runai.errors import UserError
from torchtitan_runai.hf.llama import hf_compatibility_problems
from torchtitan_runai.model_lookup import model_args


def hf_source_dir(job_config: Any) -> Path | None:
    """The folder torchtitan will read HF weights from, or None when no HF initial load is set."""
    ckpt = job_config.checkpoint
    if not ckpt.initial_load_in_hf:
        return None
    return Path(ckpt.initial_load_path or job_config.model.hf_assets_path or "")


def validate_hf_import(job_config: Any) -> Path | None:
    """Check an HF initial load before training starts; returns the folder (None if unused)."""
    source = hf_source_dir(job_config)
    if source is None:
        return None
    setting = "checkpoint.initial_load_path" if job_config.checkpoint.initial_load_path else "model.hf_assets_path"
    if not job_config.checkpoint.enable:
        raise UserError(
            "checkpoint.initial_load_in_hf",
            True,
            "torchtitan loads initial weights only when checkpointing is enabled",
            "set checkpoint.enable = true",
        )
    if not job_config.checkpoint.initial_load_model_only:
        raise UserError(
            "checkpoint.initial_load_model_only",
            False,
            "a Hugging Face folder holds model weights only",
            "set checkpoint.initial_load_model_only = true",
        )
    if not source.is_dir():
        raise UserError(
            setting, str(source), "no such folder", "point it at the Hugging Face model folder (with *.safetensors)"
        )
    if not any(source.glob("*.safetensors")):
        raise UserError(
            setting,
            str(source),
            "no *.safetensors files directly inside",
            "download the model's safetensors (not only the tokenizer) there",
        )
    config_json = source / "config.json"
    if config_json.is_file():
        problems = hf_compatibility_problems(json.loads(config_json.read_text()), model_args(job_config))
        if problems:
            raise UserError(
                "model.flavor",
                job_config.model.flavor,
                f"does not match {config_json}: {problems[0]}",
                "choose the flavor of that model (8B for Llama-3.1-8B)",
            )
    return source
