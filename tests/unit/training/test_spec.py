"""torchtitan_runai.training.spec: our train specs and the one spec/flavor → model-args lookup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from torchtitan_runai import FUSED_TRAIN_SPEC_NAME, TRAIN_SPEC_NAME, upstream
from torchtitan_runai.errors import UserError
from torchtitan_runai.training import data, fused_head, logs, loss, spec, tokenizer


def config(name=TRAIN_SPEC_NAME, flavor="debugmodel", tp=1, custom_import=""):
    return SimpleNamespace(model=SimpleNamespace(name=name, flavor=flavor),
                           parallelism=SimpleNamespace(tensor_parallel_degree=tp),
                           experimental=SimpleNamespace(custom_import=custom_import))


def test_our_specs_are_torchtitans_llama3_with_our_functions():
    ours, stock = upstream.get_train_spec(TRAIN_SPEC_NAME), upstream.get_train_spec("llama3")
    assert ours.model_cls is stock.model_cls and ours.model_args is stock.model_args
    assert ours.build_loss_fn is loss.build_loss_fn
    assert ours.build_tokenizer_fn is tokenizer.build_tokenizer
    assert ours.build_dataloader_fn is data.build_dataloader
    assert ours.build_metrics_processor_fn is logs.build_metrics_processor
    assert ours.parallelize_fn is spec.parallelize and stock.build_loss_fn is not loss.build_loss_fn
    fused = upstream.get_train_spec(FUSED_TRAIN_SPEC_NAME)
    assert fused.model_cls is fused_head.FusedHeadTransformer and fused.build_loss_fn is loss.build_loss_fn


def test_lookup_returns_the_flavors_args_as_a_copy():
    found, args = spec.lookup(config(flavor="8B"))
    assert found is upstream.get_train_spec(TRAIN_SPEC_NAME)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (4096, 32, 32, 8)
    args.dim = 1  # callers (the export sets vocab_size) must not change the registry's flavor
    assert spec.model_args(config(flavor="8B")).dim == 4096


@pytest.mark.parametrize("cfg, setting", [
    (config(name="llama9"), "model.name"),
    (config(flavor="9000B"), "model.flavor"),
    (config(custom_import="no_such_module_here"), "experimental.custom_import"),
])
def test_unknown_names_are_one_user_error(cfg, setting):
    with pytest.raises(UserError) as e:
        spec.lookup(cfg)
    assert e.value.setting == setting


def test_check_model_wants_heads_divisible_by_tensor_parallel():
    assert spec.check_model(config(flavor="8B", tp=8)).n_heads == 32
    with pytest.raises(UserError) as e:
        spec.check_model(config(flavor="8B", tp=3))
    assert e.value.setting == "parallelism.tensor_parallel_degree" and "n_heads" in e.value.why
