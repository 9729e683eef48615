"""The whole job config, checked once: what the launcher, every rank and every command parse.

``parse_job_config(args, world_size)`` = ``config.parse_config`` (the file, the flags, the values)
+ the checks that need the model: the train spec and flavor exist and their head counts divide the
tensor-parallel degree (``model_lookup.check_model``), and a Hugging Face initial load matches the
flavor (``hf.initial_load.validate_hf_import``). The launcher runs it once per pod before torchrun,
every rank runs it again, so a config the launcher accepted is the config the ranks train with.
With ``resume`` (the launcher and every rank), a resume from the checkpoint folder on another node
count first takes the global and local batch that keep the run's global batch
(``checkpoint.resume.adapt_to_checkpoint``), so both validate the batch the ranks will train with.
Every mistake is one ``UserError`` naming the setting, its value and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torchtitan_runai.checkpoint.resume import adapt_to_checkpoint
from torchtitan_runai.config import parse_config
from torchtitan_runai.errors import UserError
from torchtitan_runai.hf.initial_load import validate_hf_import
from torchtitan_runai.model_lookup import check_model


def parse_job_config(args: list[str], world_size: int | None = None, resume: bool = False) -> Any:
    """Parse TOML + command line exactly as the ranks will, then validate all of it. Raises UserError.

    ``resume``: with the batch a resume from the checkpoint folder keeps at ``world_size``."""
    config = parse_config(args, world_size, adapt_to_checkpoint if resume else None)
    validate_hf_import(config)
    check_model(config)
    return config


def load_job_config(config_path: str | os.PathLike, overrides: list[str] | tuple = ()) -> Any:
    """``parse_job_config`` for a command's ``--config FILE`` plus ``--section.key value`` overrides."""
    if not Path(config_path).is_file():
        raise UserError("--config", str(config_path), "no such file", "pass the training TOML")
    return parse_job_config(["--job.config_file", str(config_path), *overrides])
