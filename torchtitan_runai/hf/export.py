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
named ``OUTPUT_DIR`` is always complete; its files get the permissions the umask gives any new file
(``follow_umask``), so other users of a shared volume can read them.

Weight names and the q/k head permutation come from torchtitan's ``Llama3StateDictAdapter.to_hf``
(the same adapter the train spec uses), not from a copy. The exported logits equal torchtitan's
forward to fp32 rounding (tests/unit/test_export.py checks ``atol=1e-4`` on the debug model).

At the end of training, ``[export] at_end = true`` makes rank 0 run the same export from the final
(full, resumable) checkpoint into ``<dump_folder>/<export.folder>``: see ``export_at_end``. We do
not use torchtitan's ``checkpoint.last_save_in_hf`` for this, because it requires a model-only
last save and the job could then not be resumed (or extended) from its final step.

Continued pretraining *from* Hugging Face weights is ``torchtitan_runai.hf.initial_load``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torchtitan_runai import storage
from torchtitan_runai.checkpoint import folder, subclasses
from torchtitan_runai.config import EXPORT_DTYPES as DTYPES
from torchtitan_runai.errors import UserError
from torchtitan_runai.hf.llama import hf_config_dict
from torchtitan_runai.model_lookup import lookup as spec_lookup

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


# --------------------------------------------------------------------------------------------
# model shape


def model_args_for(job_config: Any) -> tuple[Any, Any]:
    """(train spec, model args) of the config (``model_lookup.lookup``), llama3 family only."""
    spec, args = spec_lookup(job_config)
    if not hasattr(args, "rope_scaling_args"):
        raise UserError(
            "model.name",
            job_config.model.name,
            "export supports llama3-family models only",
            "export a llama3 / llama3_runai checkpoint",
        )
    return spec, args


def _expected_model_shapes(spec: Any, args: Any) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the model the spec builds, without allocating it."""
    import torch

    with torch.device("meta"):
        model = spec.model_cls(args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# reading the checkpoint


def resolve_step_dir(path: str | os.PathLike) -> Path:
    """The DCP step folder to read: ``path`` itself, or the newest complete ``step-N`` in it.

    Completeness is the checkpoint package's rule (``checkpoint.folder.examine``: the completion
    marker, a readable ``.metadata``, every shard at its full size); full and model-only
    checkpoints both hold the weights."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            "CHECKPOINT_STEP_DIR", str(path), "no such folder", "pass <dump_folder>/<checkpoint.folder>/step-N"
        )
    if (path / ".metadata").is_file():
        return path  # named explicitly: the user's choice
    if any(path.glob("*.safetensors")):
        raise UserError(
            "CHECKPOINT_STEP_DIR",
            str(path),
            "this is already a Hugging Face safetensors folder (last_save_in_hf)",
            "load it with transformers directly, or export a DCP step-N folder",
        )
    chosen = next((v for v in folder.scan(path) if v.complete and (v.path / ".metadata").is_file()), None)
    if chosen is None:
        raise UserError(
            "CHECKPOINT_STEP_DIR",
            str(path),
            "not a torchtitan checkpoint (no .metadata, no complete step-N inside)",
            "pass <dump_folder>/<checkpoint.folder>/step-N",
        )
    return chosen.path


def read_model_state_dict(
    step_dir: str | os.PathLike, expected: dict[str, tuple[int, ...]], dtype: str | None = None
) -> dict[str, Any]:
    """Load the model weights of a torchtitan DCP checkpoint into plain CPU tensors.

    CheckpointManager stores the model flattened: its weights are top-level keys (FQNs such as
    ``layers.0.attention.wq.weight``) beside ``optimizer``/``lr_scheduler``/``train_state``...; we
    ask DCP for the model keys only, so optimizer state is never read. Loads with ``no_dist``:
    no process group is needed, whatever the number of ranks that wrote it. Tensors are
    allocated in ``dtype`` (default: as stored) and DCP converts while reading. A float8-trained
    checkpoint (torchao's weight classes in its pickles) reads the same, with torchao's classes
    allowed (``checkpoint.subclasses.load_allowing_torchao``): the weights come out plain.
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
            "CHECKPOINT_STEP_DIR",
            str(step_dir),
            f"missing {len(missing)} weights of the configured model (e.g. {missing[0]}); "
            f"it holds {len(model_keys)} model tensors",
            "pass the --config (model.name / model.flavor) the checkpoint was trained with",
        )
    mismatched = [
        f"{k}: checkpoint {tuple(stored[k].size)} vs config {shape}"
        for k, shape in expected.items()
        if isinstance(stored[k], TensorStorageMetadata)
        and tuple(stored[k].size) != shape
        and k != "tok_embeddings.weight"
        and k != "output.weight"
    ]
    if mismatched:
        raise UserError(
            "model.flavor",
            None,
            f"checkpoint shapes differ ({mismatched[0]})",
            "pass the --config (model.flavor) the checkpoint was trained with",
        )
    torch_dtype = getattr(torch, dtype) if dtype else None
    state_dict = {
        k: torch.empty(tuple(stored[k].size), dtype=torch_dtype or stored[k].properties.dtype) for k in expected
    }
    subclasses.load_allowing_torchao(
        lambda: dcp.load(state_dict, storage_reader=FileSystemReader(str(step_dir)), no_dist=True),
        "CHECKPOINT_STEP_DIR",
        str(step_dir),
    )
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


def current_umask() -> int:
    try:  # read, not set: setting it (os.umask) races with other threads creating files
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give the export the permissions any new file gets (0666 / 0777 less the umask): the staging
    folder comes from mkdtemp (0700) and safetensors writes 0600, which another pod's user or a
    notebook on the shared volume could not read."""
    mask = current_umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def export_checkpoint(
    step_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    job_config: Any,
    dtype: str = "bfloat16",
    *,
    max_shard_gb: float = 5.0,
    tokenizer: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export a torchtitan llama3 checkpoint step folder as a Hugging Face Llama folder.

    ``job_config``: the parsed training config (``job.load_job_config``). Returns the
    output folder. Raises UserError for anything the user can fix.
    """
    import torch

    from torchtitan_runai.upstream import Llama3StateDictAdapter

    if dtype not in DTYPES:
        raise UserError("--dtype", dtype, "unsupported export dtype", f"one of {DTYPES}")
    out = Path(output_dir)
    # Before anything else: no export (--overwrite included) may replace or write into a checkpoint.
    guarded = folder.checkpoint_around(out)
    if guarded is not None:
        inside = guarded == out.resolve() or guarded in out.resolve().parents
        raise UserError(
            "OUTPUT_DIR",
            str(out),
            f"{'is inside' if inside else 'contains'} the checkpoint {guarded}: the export would write into or "
            "replace resumable checkpoints",
            "export to a folder outside the checkpoint folder, e.g. <dump_folder>/hf (nothing was written)",
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError("OUTPUT_DIR", str(out), "exists and is not empty", "choose a new folder or pass --overwrite")
    assets = Path(job_config.model.hf_assets_path or "")
    if tokenizer and not any((assets / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            "model.hf_assets_path",
            str(assets),
            "no tokenizer files there",
            "point it at the tokenizer folder the job used, or pass --no-tokenizer",
        )

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
        args,
        intermediate_size=hf_state_dict["model.layers.0.mlp.gate_proj.weight"].shape[0],
        dtype=dtype,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
    )

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
            generation = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}
            (staging / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
        (staging / "torchtitan_export.json").write_text(
            json.dumps(
                {
                    "source_checkpoint": str(step_dir.resolve()),
                    "model": job_config.model.name,
                    "flavor": job_config.model.flavor,
                    "dtype": dtype,
                    "torch": torch.__version__,
                },
                indent=2,
            )
            + "\n"
        )
        follow_umask(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# end of training


def export_at_end(job_config: Any, step: int, rank: int) -> Path | None:
    """Run by the trainer on every rank after the final checkpoint is saved; rank 0 exports.

    No collective here: an export of a large model takes minutes, longer than the training
    collectives' timeout; the other ranks simply finish while rank 0 writes.
    """
    from torchtitan_runai.upstream import logger

    section = getattr(job_config, "export", None)
    if section is None or not section.at_end or rank != 0:
        return None
    step_dir = storage.checkpoint_dir(job_config) / f"step-{step}"
    out = storage.export_dir(job_config)
    logger.info(f"Exporting step {step} to Hugging Face format at {out} ({section.dtype})")
    try:
        export_checkpoint(step_dir, out, job_config, section.dtype, max_shard_gb=section.max_shard_gb, overwrite=True)
    except UserError as error:
        # The checkpoint is saved and resumable; a failed export must not fail the job.
        logger.error(
            f"Export skipped: {error.line()}. The checkpoint {step_dir} is intact; "
            "run python -m torchtitan_runai.export by hand"
        )
        return None
    logger.info(f"Exported Hugging Face model to {out}")
    return out
