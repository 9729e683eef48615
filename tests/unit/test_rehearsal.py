"""The CPU rehearsal's plan for each shipped recipe (pure: no launch), its TOML, overrides and blame."""

from __future__ import annotations

import pytest
import tomllib

from torchtitan_runai.config import read_toml
from torchtitan_runai.errors import UserError
from torchtitan_runai.rehearsal import (
    FLOAT8,
    INTERVAL,
    blame,
    lookup,
    merge_args,
    plan_rehearsal,
    to_toml,
    with_settings,
)

RECIPES = "train_configs/{}.toml"


def recipe(name: str) -> dict:
    return read_toml(RECIPES.format(name))


def rehearsed(name: str, ngpu: int = 4, torchao: bool = True, *args: str):
    config, _ = merge_args(recipe(name), list(args))
    plan = plan_rehearsal(config, ngpu, torchao=torchao)
    return plan, with_settings(config, plan.settings)


def degrees(config: dict) -> tuple[int, int, int, int]:
    p = config["parallelism"]
    return (
        p.get("pipeline_parallel_degree", 1),
        p.get("data_parallel_replicate_degree", 1),
        p.get("tensor_parallel_degree", 1),
        p["data_parallel_shard_degree"],
    )


def test_every_recipe_becomes_the_debug_model_on_the_offline_assets_with_a_toy_schedule():
    for name in ("debug_model", "llama3_8b", "llama3_70b", "llama3_405b"):
        plan, config = rehearsed(name)
        assert config["model"]["flavor"] == "debugmodel"
        assert config["model"]["name"] == recipe(name)["model"]["name"]  # the recipe's train spec
        assert config["model"]["hf_assets_path"].endswith("assets/rehearsal/tokenizer")
        assert "repo_id" not in config.get("hub", {})  # never a download
        assert config["training"]["dataset"] == "local"
        assert config["training"]["steps"] <= 6 and config["training"]["seq_len"] <= 128
        assert config["checkpoint"]["enable"] and config["checkpoint"]["interval"] == INTERVAL


def test_fsdp_recipes_fill_the_ranks_with_fsdp():
    for name in ("debug_model", "llama3_8b"):
        plan, config = rehearsed(name)
        assert degrees(config) == (1, 1, 1, 4) and plan.layout == "FSDP 4"
    plan, config = rehearsed("debug_model", 2)
    assert plan.layout == "FSDP 2"


def test_70b_keeps_tp_and_fsdp_its_checkpoint_modes_and_full_ac():
    plan, config = rehearsed("llama3_70b")
    assert degrees(config) == (1, 1, 2, 2) and plan.layout == "TP 2 x FSDP 2"
    assert config["checkpoint"]["async_mode"] == "async_with_pinned_mem"
    assert config["activation_checkpoint"]["mode"] == "full"
    assert config["training"]["mixed_precision_param"] == "bfloat16"
    assert "activation checkpointing full" in plan.features
    assert "checkpoint async_mode async_with_pinned_mem" in plan.features
    assert any(n.startswith("model 70B (model.flavor)") for n in plan.notes)
    assert not any("compile" in n or "float8" in n for n in plan.notes)  # 70B uses neither


def test_405b_keeps_float8_emulated_and_notes_async_tp_and_compile():
    plan, config = rehearsed("llama3_405b")
    assert plan.layout == "TP 2 x FSDP 2"
    assert config["model"]["converters"] == [FLOAT8]
    float8 = config["quantize"]["linear"]["float8"]
    assert float8["emulate"] is True and float8["enable_fsdp_float8_all_gather"] is True
    assert "float8 (emulated, FSDP float8 all-gather)" in plan.features
    assert config["compile"]["enable"] is False and config["parallelism"]["enable_async_tensor_parallel"] is False
    notes = "\n".join(plan.notes)
    assert "async TP (parallelism.enable_async_tensor_parallel)" in notes and "plain TP 2 stands in" in notes
    assert "torch.compile (compile.enable)" in notes and "eager stands in" in notes
    assert len(plan.notes) == len(set(plan.notes))


def test_405b_without_torchao_drops_float8_with_a_note():
    plan, config = rehearsed("llama3_405b", 4, False)
    assert config["model"]["converters"] == []
    assert any(n.startswith("float8 (model.converters") and "torchao is not installed" in n for n in plan.notes)


def test_pp_is_kept_with_fsdp():
    plan, config = rehearsed("debug_model", 4, True, "--parallelism.pipeline_parallel_degree", "2")
    assert degrees(config) == (2, 1, 1, 2) and plan.layout == "PP 2 x FSDP 2"
    plan, config = rehearsed("llama3_70b", 8, True, "--parallelism.pipeline_parallel_degree=4")
    assert degrees(config) == (2, 1, 2, 2) and plan.layout == "PP 2 x TP 2 x FSDP 2"


def test_too_few_ranks_for_the_recipes_kinds_is_one_line_naming_ngpu():
    with pytest.raises(UserError) as err:
        rehearsed("llama3_70b", 2)
    assert err.value.setting == "NGPU" and "TP x FSDP" in err.value.why and "NGPU=4" in err.value.fix
    with pytest.raises(UserError, match="multiple of 2"):
        rehearsed("llama3_70b", 5)


def test_context_parallel_is_noted_and_left_out():
    plan, config = rehearsed("llama3_8b", 4, True, "--parallelism.context_parallel_degree", "2")
    assert config["parallelism"]["context_parallel_degree"] == 1 and plan.layout == "FSDP 4"
    assert any(n.startswith("context parallel 2 (parallelism.context_parallel_degree)") for n in plan.notes)


def test_the_rehearsal_config_is_toml_that_reads_back():
    _, config = rehearsed("llama3_405b")
    assert tomllib.loads(to_toml(config)) == config


def test_merge_args_reads_the_launchers_argument_forms():
    base = recipe("llama3_405b")
    merged, config_file = merge_args(
        base,
        [
            "--job.config_file",
            "x.toml",
            "--compile.enable",
            "--no-checkpoint.enable",
            "--training.steps=9",
            "--model.converters",
            "a,b",
            "--optimizer.lr",
            "1e-3",
        ],
    )
    assert config_file == "x.toml"
    assert merged["compile"]["enable"] is True and merged["checkpoint"]["enable"] is False
    assert merged["training"]["steps"] == 9 and merged["model"]["converters"] == ["a", "b"]
    assert merged["optimizer"]["lr"] == 1e-3 and lookup(base, "training.steps") == 3000  # the recipe untouched


def test_blame_names_the_setting_of_a_failure():
    assert blame("run_llama_train.sh: error: training.seq_len = 7: must be ... Fix: x") == "training.seq_len"
    trace = "Traceback (most recent call last):\n  File 'x'\nRuntimeError: {}"
    assert blame(trace.format("torchao float8 emulate")) == "model.converters (float8)"
    assert blame(trace.format("PipelineStage got")) == "parallelism.pipeline_parallel_degree"
    assert blame(trace.format("DTensor redistribute")) == "parallelism.tensor_parallel_degree"
    assert blame(trace.format("torch._inductor.exc.CppCompileError")) == "compile.enable"
    assert blame("nothing known") == "the recipe's layout"


def test_ngpu_that_is_not_a_count_is_one_line():
    from torchtitan_runai.rehearsal import rehearse

    with pytest.raises(UserError) as err:
        rehearse(["--job.config_file", RECIPES.format("debug_model")], {"NGPU": "four"})
    assert err.value.setting == "NGPU"
