"""Export the checkpoint of a real 2-rank FSDP run (the shared `trained_run`) and compare logits."""

import json

import torch
from conftest import DEBUG_CONFIG, REPO

from torchtitan_runai.hf.export import export_checkpoint, model_args_for, read_model_state_dict
from torchtitan_runai.job import load_job_config

ATOL = RTOL = 1e-5  # fp32 on CPU; the largest difference seen is ~5e-7


def test_export_of_a_sharded_training_checkpoint_matches_torchtitan(trained_run, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(REPO)  # the config's tokenizer path is relative to the repo root
    step_dir = trained_run["checkpoint"] / "step-12"
    out = export_checkpoint(step_dir, tmp_path / "hf", load_job_config(DEBUG_CONFIG), dtype="float32")
    job_config = load_job_config(DEBUG_CONFIG)
    spec, args = model_args_for(job_config)
    model = spec.model_cls(args)
    model.load_state_dict(read_model_state_dict(step_dir, {k: tuple(v.shape) for k, v in model.state_dict().items()}))
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    toks = torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(toks)
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(toks).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert (out / "tokenizer.json").is_file()
