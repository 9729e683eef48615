"""Get the model out: a torchtitan checkpoint step folder → a Hugging Face Llama folder.

Usage::

    python -m torchtitan_runai.export CHECKPOINT_STEP_DIR OUTPUT_DIR --config CONFIG_FILE \\
        [--dtype bfloat16|float16|float32] [--max-shard-gb 5] [--overwrite] [--no-tokenizer] \\
        [--model.flavor 8B ...]

``CHECKPOINT_STEP_DIR`` is ``<job.dump_folder>/<checkpoint.folder>/step-N`` (a checkpoint folder
with several ``step-N`` is accepted too: its newest complete step is used). ``--config`` is the
training TOML (the same file the job ran with); unknown ``--section.key value`` arguments override
it exactly as they do for training. The result loads with
``transformers.AutoModelForCausalLM.from_pretrained(OUTPUT_DIR)`` and holds:

- ``config.json`` (``LlamaForCausalLM``; Llama-3.1 ``rope_scaling`` identical to torchtitan's
  ``precompute_freqs_cis``, written both as ``rope_scaling``/``rope_theta`` for transformers 4.x
  and ``rope_parameters`` for 5.x), ``generation_config.json``;
- ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``;
- the tokenizer files found in ``model.hf_assets_path``.

Only model weights are read (optimizer state is never loaded), on the CPU, in one process with no
process group, directly in the export dtype: peak memory is about the model size in that dtype
(16 GB for 8B in bfloat16). Full checkpoints and model-only ones (``last_save_model_only``) both
work. The output is written to a temporary sibling folder and renamed at the end, so a folder
named ``OUTPUT_DIR`` is always complete.

Weight names and the q/k head permutation come from torchtitan's ``Llama3StateDictAdapter.to_hf``
(the same adapter the train spec uses), not from a copy. The exported logits equal torchtitan's
forward to fp32 rounding (tests/unit/test_export.py checks ``atol=1e-4`` on the debug model).

At the end of training, ``[export] at_end = true`` makes rank 0 run the same export from the final
(full, resumable) checkpoint into ``<dump_folder>/<export.folder>``: see ``export_at_end``. We do
not use torchtitan's ``checkpoint.last_save_in_hf`` for this, because it requires a model-only
last save and the job could then not be resumed (or extended) from its final step.

Continued pretraining *from* Hugging Face weights is ``torchtitan_runai.hf_import``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torchtitan_runai.errors import UserError, cli

DTYPES = ("bfloat16", "float16", "float32")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
GENERATION_CONFIG = "generation_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Top-level keys CheckpointManager writes beside the flattened model weights.
NON_MODEL_PREFIXES = ("optimizer", "lr_scheduler", "dataloader", "train_state")


@dataclass
class Export:
    """[export]: a Hugging Face copy of the model when training completes."""

    at_end: bool = False
    """Write a Hugging Face Llama folder from the final checkpoint when training reaches
    training.steps (rank 0, on the CPU, after the final full checkpoint is saved; the
    checkpoint itself stays resumable). Needs checkpoint.enable."""

    folder: str = "hf"
    """Output folder, relative to job.dump_folder unless absolute."""

    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Weight dtype of the exported safetensors."""

    max_shard_gb: float = 5.0
    """Largest safetensors file, in GB (1e9 bytes); bigger models are split with an index."""


# --------------------------------------------------------------------------------------------
# config and model shape


def load_job_config(config_path: str | os.PathLike, overrides: list[str] | tuple = ()) -> Any:
    """Parse and validate a training TOML (plus ``--section.key value`` overrides) as the ranks do."""
    from torchtitan_runai.config import parse_job_config

    if not Path(config_path).is_file():
        raise UserError("--config", str(config_path), "no such file", "pass the training TOML")
    return parse_job_config(["--job.config_file", str(config_path), *overrides])


def _ensure_spec_registered() -> None:
    try:
        import torchtitan_runai.spec  # noqa: F401  (registers "llama3_runai")
    except ModuleNotFoundError as missing:
        if missing.name != "torchtitan_runai.spec":
            raise


def model_args_for(job_config: Any) -> tuple[Any, Any]:
    """(train spec, model args) for job_config.model.name/flavor, as the trainer builds them."""
    from torchtitan_runai.upstream import get_train_spec

    _ensure_spec_registered()
    name, flavor = job_config.model.name, job_config.model.flavor
    try:
        spec = get_train_spec(name)
    except Exception as error:  # torchtitan raises ValueError/ImportError for unknown names
        raise UserError("model.name", name, f"no such train spec ({error})",
                        "use the model.name the job trained with") from None
    if flavor not in spec.model_args:
        raise UserError("model.flavor", flavor, f"{name} has no such flavor",
                        f"one of {sorted(spec.model_args)}")
    args = copy.deepcopy(spec.model_args[flavor])
    if not hasattr(args, "rope_scaling_args"):
        raise UserError("model.name", name, "export supports llama3-family models only",
                        "export a llama3 / llama3_runai checkpoint")
    return spec, args


def _expected_model_shapes(spec: Any, args: Any) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the model the spec builds, without allocating it."""
    import torch

    with torch.device("meta"):
        model = spec.model_cls(args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def hf_config_dict(args: Any, *, intermediate_size: int, dtype: str,
                   max_position_embeddings: int, bos_token_id: int | None = None,
                   eos_token_id: int | list[int] | None = None) -> dict[str, Any]:
    """config.json for LlamaForCausalLM matching torchtitan's llama3 Transformer ``args``.

    torchtitan always applies the Llama-3.1 rope scaling (``RoPEScalingArgs``), so rope_type is
    ``llama3`` with the same factors; rms_norm_eps is torchtitan's ``norm_eps`` (nn.RMSNorm).
    """
    n_kv_heads = args.n_kv_heads if args.n_kv_heads is not None else args.n_heads
    scaling = args.rope_scaling_args
    rope_scaling = {
        "rope_type": "llama3",
        "factor": float(scaling.scaling_factor),
        "low_freq_factor": float(scaling.low_freq_factor),
        "high_freq_factor": float(scaling.high_freq_factor),
        "original_max_position_embeddings": int(scaling.original_max_position_embeddings),
    }
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": args.dim // args.n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(args.norm_eps),
        "vocab_size": args.vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": float(args.rope_theta),
        "rope_scaling": rope_scaling,
        "rope_parameters": {**rope_scaling, "rope_theta": float(args.rope_theta)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if bos_token_id is not None:
        config["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    return config


# --------------------------------------------------------------------------------------------
# reading the checkpoint


def resolve_step_dir(path: str | os.PathLike) -> Path:
    """The DCP step folder to read: ``path`` itself, or the newest complete ``step-N`` in it."""
    path = Path(path)
    if not path.is_dir():
        raise UserError("CHECKPOINT_STEP_DIR", str(path), "no such folder",
                        "pass <dump_folder>/<checkpoint.folder>/step-N")
    if (path / ".metadata").is_file():
        return path
    if any(path.glob("*.safetensors")):
        raise UserError("CHECKPOINT_STEP_DIR", str(path),
                        "this is already a Hugging Face safetensors folder (last_save_in_hf)",
                        "load it with transformers directly, or export a DCP step-N folder")
    steps = sorted(
        (int(m.group(1)), child) for child in path.iterdir()
        if (m := re.fullmatch(r"step-(\d+)", child.name)) and (child / ".metadata").is_file()
    )
    if not steps:
        raise UserError("CHECKPOINT_STEP_DIR", str(path),
                        "not a torchtitan checkpoint (no .metadata, no complete step-N inside)",
                        "pass <dump_folder>/<checkpoint.folder>/step-N")
    return steps[-1][1]


def read_model_state_dict(step_dir: str | os.PathLike, expected: dict[str, tuple[int, ...]],
                          dtype: str | None = None) -> dict[str, Any]:
    """Load the model weights of a torchtitan DCP checkpoint into plain CPU tensors.

    CheckpointManager stores the model flattened: its weights are top-level keys (FQNs such as
    ``layers.0.attention.wq.weight``) beside ``optimizer``/``lr_scheduler``/``train_state``...; we
    ask DCP for the model keys only, so optimizer state is never read. Loads with ``no_dist``:
    no process group is needed, whatever the number of ranks that wrote it. Tensors are
    allocated in ``dtype`` (default: as stored) and DCP converts while reading.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    step_dir = Path(step_dir)
    stored = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    missing = sorted(k for k in expected if k not in stored)
    if missing:
        model_keys = [k for k in stored if not k.startswith(NON_MODEL_PREFIXES)]
        raise UserError(
            "CHECKPOINT_STEP_DIR", str(step_dir),
            f"missing {len(missing)} weights of the configured model (e.g. {missing[0]}); "
            f"it holds {len(model_keys)} model tensors",
            "pass the --config (model.name / model.flavor) the checkpoint was trained with")
    mismatched = [
        f"{k}: checkpoint {tuple(stored[k].size)} vs config {shape}"
        for k, shape in expected.items()
        if isinstance(stored[k], TensorStorageMetadata) and tuple(stored[k].size) != shape
        and k != "tok_embeddings.weight" and k != "output.weight"
    ]
    if mismatched:
        raise UserError("model.flavor", None, f"checkpoint shapes differ ({mismatched[0]})",
                        "pass the --config (model.flavor) the checkpoint was trained with")
    torch_dtype = getattr(torch, dtype) if dtype else None
    state_dict = {
        k: torch.empty(tuple(stored[k].size), dtype=torch_dtype or stored[k].properties.dtype)
        for k in expected
    }
    dcp.load(state_dict, storage_reader=FileSystemReader(str(step_dir)), no_dist=True)
    return state_dict


# --------------------------------------------------------------------------------------------
# writing the Hugging Face folder


def write_safetensors(hf_state_dict: dict[str, Any], out: Path, max_shard_bytes: int) -> list[str]:
    """Write one ``model.safetensors`` or shards + ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    shards: list[dict[str, Any]] = [{}]
    size = 0
    for key, tensor in hf_state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        names.append(name)
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names + [SAFETENSORS_INDEX]


def _special_token_ids(assets: Path) -> tuple[int | None, int | list[int] | None]:
    """bos/eos ids: from the assets' config.json if present, else from the tokenizer files."""
    config_json = assets / "config.json"
    if config_json.is_file():
        config = json.loads(config_json.read_text())
        return config.get("bos_token_id"), config.get("eos_token_id")
    try:
        tok_config = json.loads((assets / "tokenizer_config.json").read_text())
        tokenizer = json.loads((assets / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None, None
    ids = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    vocab = tokenizer.get("model", {}).get("vocab", {})

    def token_id(field: str) -> int | None:
        token = tok_config.get(field)
        token = token.get("content") if isinstance(token, dict) else token
        if token is None:
            return None
        return ids.get(token, vocab.get(token) if isinstance(vocab, dict) else None)

    return token_id("bos_token"), token_id("eos_token")


def copy_tokenizer(assets: Path, out: Path) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (assets / name).is_file()]
    for name in copied:
        shutil.copy2(assets / name, out / name)
    return copied


def export_checkpoint(step_dir: str | os.PathLike, output_dir: str | os.PathLike,
                      job_config_or_config_path: Any, dtype: str = "bfloat16", *,
                      max_shard_gb: float = 5.0, tokenizer: bool = True,
                      overwrite: bool = False) -> Path:
    """Export a torchtitan llama3 checkpoint step folder as a Hugging Face Llama folder.

    ``job_config_or_config_path``: a JobConfig, or the path of the training TOML. Returns the
    output folder. Raises UserError for anything the user can fix.
    """
    import torch

    from torchtitan_runai.upstream import Llama3StateDictAdapter

    if dtype not in DTYPES:
        raise UserError("--dtype", dtype, "unsupported export dtype", f"one of {DTYPES}")
    job_config = (
        load_job_config(job_config_or_config_path)
        if isinstance(job_config_or_config_path, (str, os.PathLike))
        else job_config_or_config_path
    )
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError("OUTPUT_DIR", str(out), "exists and is not empty",
                        "choose a new folder or pass --overwrite")
    assets = Path(job_config.model.hf_assets_path or "")
    if tokenizer and not any((assets / name).is_file() for name in TOKENIZER_FILES):
        raise UserError("model.hf_assets_path", str(assets), "no tokenizer files there",
                        "point it at the tokenizer folder the job used, or pass --no-tokenizer")

    step_dir = resolve_step_dir(step_dir)
    spec, args = model_args_for(job_config)
    max_position_embeddings = args.max_seq_len  # the flavor's, not the training seq_len
    expected = _expected_model_shapes(spec, args)
    state_dict = read_model_state_dict(step_dir, expected, dtype=dtype)
    # The embedding rows are the truth for vocab_size (a spec may size it from the tokenizer).
    args.vocab_size = state_dict["tok_embeddings.weight"].shape[0]
    hf_state_dict = Llama3StateDictAdapter(args, None).to_hf(state_dict)
    del state_dict

    bos, eos = _special_token_ids(assets) if tokenizer else (None, None)
    config = hf_config_dict(
        args, intermediate_size=hf_state_dict["model.layers.0.mlp.gate_proj.weight"].shape[0],
        dtype=dtype, max_position_embeddings=max_position_embeddings,
        bos_token_id=bos, eos_token_id=eos)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write_safetensors(hf_state_dict, staging, int(max_shard_gb * 1e9))
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer:
            copy_tokenizer(assets, staging)
            if (assets / GENERATION_CONFIG).is_file():
                shutil.copy2(assets / GENERATION_CONFIG, staging / GENERATION_CONFIG)
        if not (staging / GENERATION_CONFIG).is_file():
            generation = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos))
                          if v is not None}
            (staging / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
        (staging / "torchtitan_export.json").write_text(json.dumps({
            "source_checkpoint": str(step_dir.resolve()),
            "model": job_config.model.name, "flavor": job_config.model.flavor,
            "dtype": dtype, "torch": torch.__version__,
        }, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# end of training


def export_dir_for(job_config: Any) -> Path:
    return Path(job_config.job.dump_folder) / job_config.export.folder


def validate_export_config(job_config: Any) -> None:
    """Config-time checks for [export] (call from the whole-config validation)."""
    section = getattr(job_config, "export", None)
    if section is None or not section.at_end:
        return
    if not job_config.checkpoint.enable:
        raise UserError("export.at_end", True, "exports from the final checkpoint",
                        "set checkpoint.enable = true")
    if section.dtype not in DTYPES:
        raise UserError("export.dtype", section.dtype, "unsupported", f"one of {DTYPES}")
    if job_config.checkpoint.last_save_in_hf:
        raise UserError("checkpoint.last_save_in_hf", True,
                        "makes the final checkpoint model-only and unresumable",
                        "use export.at_end = true instead")


def export_at_end(job_config: Any, step: int, rank: int) -> Path | None:
    """Run by the trainer on every rank after the final checkpoint is saved; rank 0 exports.

    No collective here: an export of a large model takes minutes, longer than the training
    collectives' timeout; the other ranks simply finish while rank 0 writes.
    """
    from torchtitan_runai.upstream import logger

    section = getattr(job_config, "export", None)
    if section is None or not section.at_end or rank != 0:
        return None
    step_dir = Path(job_config.job.dump_folder) / job_config.checkpoint.folder / f"step-{step}"
    out = export_dir_for(job_config)
    logger.info(f"Exporting step {step} to Hugging Face format at {out} ({section.dtype})")
    try:
        export_checkpoint(step_dir, out, job_config, section.dtype,
                          max_shard_gb=section.max_shard_gb, overwrite=True)
    except UserError as error:
        # The checkpoint is saved and resumable; a failed export must not fail the job.
        logger.error(f"Export skipped: {error.line()}. The checkpoint {step_dir} is intact; "
                     "run python -m torchtitan_runai.export by hand")
        return None
    logger.info(f"Exported Hugging Face model to {out}")
    return out


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchtitan_runai.export",
        description="Export a torchtitan checkpoint step folder as a Hugging Face Llama folder.",
        epilog="Other --section.key value arguments override the config, as in training.")
    parser.add_argument("checkpoint_step_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--config", required=True, help="the training TOML the job ran with")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="do not require/copy tokenizer files from model.hf_assets_path")
    known, overrides = parser.parse_known_args(argv)
    job_config = load_job_config(known.config, overrides)
    out = export_checkpoint(known.checkpoint_step_dir, known.output_dir, job_config, known.dtype,
                            max_shard_gb=known.max_shard_gb, tokenizer=not known.no_tokenizer,
                            overwrite=known.overwrite)
    print(f"exported {known.checkpoint_step_dir} -> {out}")
    return 0


if __name__ == "__main__":
    cli(main, "torchtitan_runai.export")
