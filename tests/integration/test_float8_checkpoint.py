"""A float8 run's checkpoint exports and loads, with real processes: the launcher, torchrun, gloo, 2 ranks.

The 405B recipe's float8 settings on the CPU (``float8.emulate``): FSDP 2 with float8 all-gather
and precomputed scales. Its weights are torchao's ``WeightWithDynamicFloat8CastTensor``, which DCP
pickles by name; reading them back in a process without torchao imported failed with
``UnpicklingError ... WeightWithDynamicFloat8CastTensor`` (``checkpoint.subclasses``).

Proven:

- ``python -m torchtitan_runai.export`` (a fresh process) exports the float8 checkpoint;
  transformers loads the folder and its logits equal torchtitan's model on the checkpoint's
  weights; its loss on the first global batch equals the logged step-1 loss of a run started from
  the checkpoint (below);
- a run without float8 starts from the float8 checkpoint (DCP, model-only initial load) and logs that
  loss;
- a float8 run (all-gather included) starts from the exported Hugging Face folder
  (``initial_load_in_hf``) and logs the same loss within float8's emulated rounding.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import DEBUG_CONFIG, REPO, launcher_cmd, losses, pod_env

pytest.importorskip("torchao", reason="float8 training needs torchao (the test extra installs it)")

FLOAT8 = (
    "--model.converters",
    "quantize.linear.float8",
    "--quantize.linear.float8.emulate",
    "--quantize.linear.float8.enable_fsdp_float8_all_gather",
    "--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp",
    "--quantize.linear.float8.filter_fqns",
    "output",
)
SEED, GLOBAL_BATCH = "1234", 8  # the debug recipe: 4 per rank, 2 ranks
LOG_ABS = 2e-5  # the step line prints the loss with 5 decimals
FLOAT8_ABS = 0.05  # float8 matmuls (e4m3/e5m2, tensorwise scales) against float32 ones


def launch(dump, *more: str) -> str:
    proc = subprocess.run(
        launcher_cmd("--job.dump_folder", str(dump), "--debug.seed", SEED, *more),
        env=pod_env(NGPU="2"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def first_batch_loss(model_fn) -> float:
    """The mean token loss of step 1's global batch (the data order is the same at any DP size)."""
    from torchtitan_runai.job import load_job_config
    from torchtitan_runai.training.data import build_dataloader
    from torchtitan_runai.training.tokenizer import build_tokenizer

    job_config = load_job_config(DEBUG_CONFIG)
    job_config.training.local_batch_size = GLOBAL_BATCH
    loader = build_dataloader(1, 0, build_tokenizer(job_config), job_config)
    inputs, labels = next(iter(loader))
    with torch.no_grad():
        logits = model_fn(inputs["input"])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).item()


@pytest.mark.slow
def test_a_float8_all_gather_checkpoint_exports_and_initial_loads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from torchtitan_runai.hf.export import model_args_for, read_model_state_dict
    from torchtitan_runai.job import load_job_config

    monkeypatch.chdir(REPO)  # the config's tokenizer and data paths are relative to the repo root
    trained = launch(tmp_path / "f8", "--training.steps", "2", "--checkpoint.interval", "2", *FLOAT8)
    assert "Float8" in trained or "float8" in trained.lower()
    step_dir = tmp_path / "f8" / "checkpoint" / "step-2"

    hf = tmp_path / "hf"
    export = subprocess.run(
        [sys.executable, "-m", "torchtitan_runai.export", str(step_dir), str(hf), "--config", DEBUG_CONFIG]
        + ["--dtype", "float32"],
        cwd=REPO,
        env=pod_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr[-3000:]

    # a run without float8 from the float8 checkpoint (DCP, model only): step 1's loss = the checkpoint's
    plain = launch(
        tmp_path / "plain",
        "--training.steps",
        "1",
        "--checkpoint.initial_load_path",
        str(step_dir),
        "--checkpoint.initial_load_model_only",
    )
    plain_loss = losses(plain)[1]
    # a float8 run (all-gather) from the exported Hugging Face folder
    from_hf = launch(
        tmp_path / "from_hf",
        "--training.steps",
        "1",
        "--checkpoint.initial_load_path",
        str(hf),
        "--checkpoint.initial_load_in_hf",
        "--checkpoint.initial_load_model_only",
        *FLOAT8,
    )
    assert f"initial weights from {hf}" in from_hf or str(hf) in from_hf
    assert abs(losses(from_hf)[1] - plain_loss) < FLOAT8_ABS, (losses(from_hf), plain_loss)

    # transformers: logits = torchtitan's model on the checkpoint's weights; loss = the logged one
    job_config = load_job_config(DEBUG_CONFIG)
    spec, args = model_args_for(job_config)
    model = spec.model_cls(args)
    model.load_state_dict(read_model_state_dict(step_dir, {k: tuple(v.shape) for k, v in model.state_dict().items()}))
    model.eval()
    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    toks = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(toks).logits, model(toks), atol=1e-5, rtol=1e-5)
    hf_loss = first_batch_loss(lambda x: hf_model(x).logits)
    assert abs(hf_loss - plain_loss) <= LOG_ABS, (hf_loss, plain_loss)
    # and the float8 run did train: its weights are not the fresh ones (8.07 at step 1 for this seed)
    assert plain_loss < losses(trained)[1] - 0.1, (plain_loss, losses(trained))
