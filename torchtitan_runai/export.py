"""``python -m torchtitan_runai.export``: a checkpoint step folder → a Hugging Face Llama folder.

Usage::

    python -m torchtitan_runai.export CHECKPOINT_STEP_DIR OUTPUT_DIR --config CONFIG_FILE \\
        [--dtype bfloat16|float16|float32] [--max-shard-gb 5] [--overwrite] [--no-tokenizer] \\
        [--model.flavor 8B ...]

The command line only: what is exported, and how, is ``torchtitan_runai.hf.export`` (its module
docstring is the manual). Other ``--section.key value`` arguments override the config, as in training.
"""

from __future__ import annotations

import argparse

from torchtitan_runai.config import EXPORT_DTYPES as DTYPES
from torchtitan_runai.errors import cli
from torchtitan_runai.hf.export import export_checkpoint
from torchtitan_runai.job import load_job_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchtitan_runai.export",
        description="Export a torchtitan checkpoint step folder as a Hugging Face Llama folder.",
        epilog="Other --section.key value arguments override the config, as in training.",
    )
    parser.add_argument("checkpoint_step_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--config", required=True, help="the training TOML the job ran with")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--no-tokenizer", action="store_true", help="do not require/copy tokenizer files from model.hf_assets_path"
    )
    known, overrides = parser.parse_known_args(argv)
    job_config = load_job_config(known.config, overrides)
    out = export_checkpoint(
        known.checkpoint_step_dir,
        known.output_dir,
        job_config,
        known.dtype,
        max_shard_gb=known.max_shard_gb,
        tokenizer=not known.no_tokenizer,
        overwrite=known.overwrite,
    )
    print(f"exported {known.checkpoint_step_dir} -> {out}")
    return 0


if __name__ == "__main__":
    cli(main, "torchtitan_runai.export")
