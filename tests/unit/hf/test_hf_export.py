"""Export (checkpoint → Hugging Face folder) and import (HF weights → torchtitan) round trips.

The checkpoint is written by torchtitan's own CheckpointManager (model + optimizer + lr scheduler
+ train state, the layout a training job leaves on the volume) for the llama3 debug model. Set
TORCHTITAN_RUNAI_CHECKPOINT_FIXTURE=<step-N dir>:<config.toml> to run the export checks on a
checkpoint from a real multi-rank run as well.

Tolerance: exported HF logits vs torchtitan's forward, fp32 on CPU, 2x512 tokens: atol 1e-5,
rtol 1e-5 (seen: 5e-7). Tight on purpose: leaving out the Llama-3.1 rope scaling in config.json
moves the logits by ~1e-4 at 512 tokens, and the test checks that it would be caught. The import round trip (to_hf
then from_hf) is a pure permutation: exactly equal weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchtitan_runai import upstream
from torchtitan_runai.checkpoint import folder as ckfolder
from torchtitan_runai.config import Export, validate
from torchtitan_runai.errors import UserError
from torchtitan_runai.export import main
from torchtitan_runai.hf.export import (
    export_at_end,
    export_checkpoint,
    resolve_step_dir,
)
from torchtitan_runai.hf.initial_load import validate_hf_import
from torchtitan_runai.hf.llama import hf_compatibility_problems
from torchtitan_runai.job import load_job_config

ATOL = RTOL = 1e-5
REPO = Path(__file__).resolve().parents[3]
FLAVOR = "debugmodel"


# ---------------------------------------------------------------------------------- helpers


def write_tokenizer(folder: Path, vocab_size: int = 512) -> None:
    """A small real byte-level BPE tokenizer (HF tokenizers) with Llama-3 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": specials[0],
                "eos_token": specials[1],
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 2048,
            }
        )
    )


def write_config(tmp: Path, assets: Path, **checkpoint: object) -> Path:
    lines = [
        "[job]",
        f'dump_folder = "{tmp / "dump"}"',
        "[model]",
        'name = "llama3"',
        f'flavor = "{FLAVOR}"',
        f'hf_assets_path = "{assets}"',
        "[training]",
        "seq_len = 64",
        "steps = 10",
        "[checkpoint]",
        "enable = true",
        'folder = "checkpoint"',
        "keep_latest_k = 0",
        "interval = 1",
    ] + [f"{k} = {json.dumps(v)}" for k, v in checkpoint.items()]
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_model(job_config, seed: int):
    spec = upstream.get_train_spec(job_config.model.name)
    args = spec.model_args[job_config.model.flavor]
    torch.manual_seed(seed)
    model = spec.model_cls(args)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
        # init_weights zeroes the output layer: randomise it so the logits mean something.
        model.output.weight.normal_(std=0.02)
    return spec, model.eval()


def checkpoint_manager(job_config, spec, model):
    """torchtitan's own CheckpointManager around model, optimizer and lr scheduler."""
    parallel_dims = upstream.ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    optimizers = spec.build_optimizers_fn([model], job_config.optimizer, parallel_dims)
    lr_schedulers = spec.build_lr_schedulers_fn(optimizers, job_config.lr_scheduler, job_config.training.steps)
    sd_adapter = spec.state_dict_adapter(spec.model_args[job_config.model.flavor], job_config.model.hf_assets_path)
    return upstream.CheckpointManager(
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        states={},
        checkpoint_config=job_config.checkpoint,
        sd_adapter=sd_adapter,
        base_folder=job_config.job.dump_folder,
    )


def tokens(vocab: int = 2048) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 512), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A full (resumable) torchtitan checkpoint at step 3 of the debug model, and its logits.

    Saved by torchtitan's CheckpointManager and then marked complete, as our manager does after
    every save (``training.checkpoint.manager``): the export only takes complete step folders."""
    tmp = tmp_path_factory.mktemp("export")
    assets = tmp / "assets"
    write_tokenizer(assets)
    config = write_config(tmp, assets)
    job_config = load_job_config(config)
    spec, model = build_model(job_config, seed=1)
    manager = checkpoint_manager(job_config, spec, model)
    manager.save(curr_step=3, last_step=False)
    manager.close()
    with torch.no_grad():
        logits = model(tokens())
    step_dir = Path(job_config.job.dump_folder) / "checkpoint" / "step-3"
    ckfolder.mark_complete(step_dir, ckfolder.marker_record(3, "full", step_dir, {}, 1, 1, "test"))
    return {
        "tmp": tmp,
        "assets": assets,
        "config": config,
        "job_config": job_config,
        "step_dir": step_dir,
        "logits": logits,
        "model": model,
    }


# ------------------------------------------------------------------------------------ export


def hf_logits(folder: Path, toks: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(toks).logits


def test_checkpoint_is_a_full_torchtitan_checkpoint(trained):
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(trained["step_dir"])).read_metadata().state_dict_metadata
    assert "tok_embeddings.weight" in keys and "layers.0.attention.wq.weight" in keys
    assert any(k.startswith("optimizer.") for k in keys)
    assert any(k.startswith("lr_scheduler") for k in keys)


def test_exported_logits_equal_torchtitan_forward(trained):
    from transformers import AutoTokenizer

    out = export_checkpoint(
        trained["step_dir"], trained["tmp"] / "hf32", load_job_config(trained["config"]), dtype="float32"
    )
    names = sorted(p.name for p in out.iterdir())
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= set(names)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert config["intermediate_size"] == 768 and config["vocab_size"] == 2048
    assert config["bos_token_id"] == 0 and config["eos_token_id"] == 1
    got = hf_logits(out, tokens())
    torch.testing.assert_close(got, trained["logits"], atol=ATOL, rtol=RTOL)
    assert AutoTokenizer.from_pretrained(out)("the fox").input_ids
    # The tolerance is tight enough to see the rope scaling (torchtitan always applies it).
    config.pop("rope_scaling")
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    unscaled = out.parent / "hf32_unscaled"
    shutil.copytree(out, unscaled)
    (unscaled / "config.json").write_text(json.dumps(config))
    assert not torch.allclose(hf_logits(unscaled, tokens()), trained["logits"], atol=ATOL, rtol=RTOL)
    assert not list(out.parent.glob(".hf32.partial-*"))


def test_bf16_sharded_export_loads(trained):
    out = export_checkpoint(
        trained["step_dir"], trained["tmp"] / "hf16", trained["job_config"], dtype="bfloat16", max_shard_gb=0.002
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    got = hf_logits(out, tokens())
    # bf16 weights: same model up to bf16 rounding of the weights.
    torch.testing.assert_close(got, trained["logits"], atol=5e-2, rtol=5e-2)


def test_cli_exports_through_python_dash_m(trained):
    out = trained["tmp"] / "hf_cli"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchtitan_runai.export",
            str(trained["step_dir"].parent),
            str(out),
            "--config",
            str(trained["config"]),
            "--dtype",
            "float32",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "step-3" in json.loads((out / "torchtitan_export.json").read_text())["source_checkpoint"]
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchtitan_runai.export",
            str(trained["step_dir"]),
            str(out),
            "--config",
            str(trained["config"]),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 2
    assert "Traceback" not in again.stderr and "--overwrite" in again.stderr


def test_user_errors_are_one_line(trained, tmp_path):
    with pytest.raises(UserError, match="not a torchtitan checkpoint"):
        resolve_step_dir(tmp_path)
    wrong_flavor = load_job_config(trained["config"], ["--model.flavor", "8B"])
    with pytest.raises(UserError, match="model.flavor"):
        export_checkpoint(trained["step_dir"], tmp_path / "x", wrong_flavor)
    no_tok = load_job_config(trained["config"], ["--model.hf_assets_path", str(tmp_path)])
    with pytest.raises(UserError, match="no tokenizer files"):
        export_checkpoint(trained["step_dir"], tmp_path / "y", no_tok)
    assert (
        main(
            [
                str(trained["step_dir"]),
                str(tmp_path / "z"),
                "--config",
                str(trained["config"]),
                "--no-tokenizer",
                "--model.hf_assets_path",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / "z" / "model.safetensors").is_file()


def test_no_export_replaces_or_writes_into_a_checkpoint(trained, tmp_path):
    """--overwrite onto the step folder it reads, the checkpoint folder or the dump folder above them
    replaced the resumable checkpoint with HF files (exit 0); now each is one line, exit 2."""
    step_dir = trained["step_dir"]
    ckpt, dump = step_dir.parent, step_dir.parent.parent
    files = sorted(p.relative_to(dump) for p in dump.rglob("*"))
    for dest in (step_dir, ckpt, dump, step_dir / "hf", ckpt / "hf", ckpt / "new" / "hf"):
        with pytest.raises(UserError, match="checkpoint") as error:
            export_checkpoint(step_dir, dest, trained["job_config"], overwrite=True)
        assert error.value.setting == "OUTPUT_DIR" and "outside the checkpoint folder" in error.value.fix
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchtitan_runai.export",
            str(step_dir),
            str(ckpt),
            "--overwrite",
            "--config",
            str(trained["config"]),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "OUTPUT_DIR" in run.stderr
    assert sorted(p.relative_to(dump) for p in dump.rglob("*")) == files  # nothing written, nothing removed
    assert ckfolder.examine(step_dir, 3).resumable
    assert ckfolder.checkpoint_around(dump.parent / "hf") is None  # beside the dump folder is fine


def test_export_at_end_keeps_checkpoint_resumable(trained):
    job_config = load_job_config(trained["config"])
    job_config.export = Export(at_end=True, folder="hf_end", dtype="float32")
    validate(job_config)
    assert export_at_end(job_config, step=3, rank=1) is None
    before = sorted(p.name for p in trained["step_dir"].iterdir())
    out = export_at_end(job_config, step=3, rank=0)
    assert out == Path(job_config.job.dump_folder) / "hf_end"
    torch.testing.assert_close(hf_logits(out, tokens()), trained["logits"], atol=ATOL, rtol=RTOL)
    assert sorted(p.name for p in trained["step_dir"].iterdir()) == before
    job_config.checkpoint.last_save_in_hf = True
    with pytest.raises(UserError, match="cannot be resumed"):
        validate(job_config)


# ------------------------------------------------------------------------------------ import


def test_import_round_trip_through_torchtitan_initial_load(trained):
    """export → torchtitan's initial_load_in_hf into a fresh model → same weights and logits."""
    hf_dir = trained["tmp"] / "hf_import_src"
    export_checkpoint(trained["step_dir"], hf_dir, load_job_config(trained["config"]), dtype="float32")
    tmp = trained["tmp"] / "continued"
    tmp.mkdir()
    config = write_config(tmp, trained["assets"], initial_load_path=str(hf_dir), initial_load_in_hf=True)
    job_config = load_job_config(config)
    assert validate_hf_import(job_config) == hf_dir
    spec, fresh = build_model(job_config, seed=2)
    with torch.no_grad():
        assert not torch.allclose(fresh(tokens()), trained["logits"], atol=ATOL)
    manager = checkpoint_manager(job_config, spec, fresh)
    assert manager.load() is True
    manager.close()
    original = trained["model"].state_dict()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, original[key]), key
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens()), trained["logits"], atol=0, rtol=0)


def test_validate_hf_import_catches_mismatch(trained, tmp_path):
    hf_dir = trained["tmp"] / "hf32"  # written by the logits test (module order) or below
    if not hf_dir.is_dir():
        export_checkpoint(trained["step_dir"], hf_dir, load_job_config(trained["config"]), dtype="float32")
    config = write_config(tmp_path, trained["assets"], initial_load_path=str(hf_dir), initial_load_in_hf=True)
    # The whole-config validation (what the launcher runs before any worker) calls validate_hf_import.
    with pytest.raises(UserError, match="hidden_size is 256"):
        load_job_config(config, ["--model.flavor", "8B"])
    with pytest.raises(UserError, match="no \\*.safetensors"):
        load_job_config(config, ["--checkpoint.initial_load_path", str(tmp_path)])
    assert validate_hf_import(load_job_config(config)) == hf_dir
    args = upstream.llama3.llama3_args["8B"]
    llama31_8b = {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }
    assert hf_compatibility_problems(llama31_8b, args) == []
    assert hf_compatibility_problems({**llama31_8b, "tie_word_embeddings": True}, args)


# ------------------------------------------------------------------------------ step choice


def test_a_checkpoint_folder_exports_its_newest_complete_step(tmp_path):
    """A newer step-N whose save was cut off (no .metadata and no marker, or a truncated shard)
    must be passed over; the export must take the newest *complete* one, by the checkpoint
    package's rule, and a model-only final save counts (it holds the weights)."""
    import torch.distributed.checkpoint as dcp

    def save(step: int, kind: str | None) -> Path:
        path = tmp_path / f"step-{step}"
        dcp.save({"w": torch.arange(100, dtype=torch.float32) * step}, checkpoint_id=str(path))
        if kind:
            ckfolder.mark_complete(path, ckfolder.marker_record(step, kind, path, {}, 1, 1, "job"))
        return path

    save(2, "full")
    assert resolve_step_dir(tmp_path) == tmp_path / "step-2"
    save(4, "model-only")
    assert resolve_step_dir(tmp_path) == tmp_path / "step-4"
    (save(6, None) / ".metadata").unlink()  # cut off before DCP's last write (with .metadata it is adopted)
    truncated = save(8, "full")
    shard = next(p for p in truncated.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:10])
    assert resolve_step_dir(tmp_path) == tmp_path / "step-4"


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_exported_files_follow_the_umask(trained, umask, folder_mode, file_mode):
    # main left model.safetensors 0600 (safetensors) and the folder 0700 (mkdtemp) whatever the
    # umask: another pod's user or a notebook on the shared volume could not read the model
    out = trained["tmp"] / f"hf_umask_{umask:o}"
    run = subprocess.run(
        [
            "sh",
            "-c",
            f'umask {umask:03o} && exec "$0" "$@"',
            sys.executable,
            "-m",
            "torchtitan_runai.export",
            str(trained["step_dir"]),
            str(out),
            "--config",
            str(trained["config"]),
            "--dtype",
            "float32",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert out.stat().st_mode & 0o777 == folder_mode
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: file_mode for p in files}
