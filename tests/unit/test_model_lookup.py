"""torchtitan_runai.model_lookup: the one spec/flavor → model-args lookup."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from torchtitan_runai import FUSED_TRAIN_SPEC_NAME, TRAIN_SPEC_NAME, model_lookup, upstream
from torchtitan_runai.errors import UserError


def config(name=TRAIN_SPEC_NAME, flavor="debugmodel", tp=1, custom_import=""):
    return SimpleNamespace(
        model=SimpleNamespace(name=name, flavor=flavor),
        parallelism=SimpleNamespace(tensor_parallel_degree=tp),
        experimental=SimpleNamespace(custom_import=custom_import),
    )


def test_lookup_returns_the_flavors_args_as_a_copy():
    found, args = model_lookup.lookup(config(flavor="8B"))
    stock = upstream.get_train_spec("llama3")  # our specs share its model and flavors (test_spec)
    assert found.model_cls is stock.model_cls and found.model_args is stock.model_args
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (4096, 32, 32, 8)
    args.dim = 1  # callers (the export sets vocab_size) must not change the registry's flavor
    assert model_lookup.model_args(config(flavor="8B")).dim == 4096


@pytest.mark.parametrize(
    "cfg, setting",
    [
        (config(name="llama9"), "model.name"),
        (config(flavor="9000B"), "model.flavor"),
        (config(custom_import="no_such_module_here"), "experimental.custom_import"),
    ],
)
def test_unknown_names_are_one_user_error(cfg, setting):
    with pytest.raises(UserError) as e:
        model_lookup.lookup(cfg)
    assert e.value.setting == setting
    with pytest.raises(UserError) as e:
        model_lookup.model_args(cfg)
    assert e.value.setting == setting


def test_check_model_wants_heads_divisible_by_tensor_parallel():
    assert model_lookup.check_model(config(flavor="8B", tp=8)).n_heads == 32
    with pytest.raises(UserError) as e:
        model_lookup.check_model(config(flavor="8B", tp=3))
    assert e.value.setting == "parallelism.tensor_parallel_degree" and "n_heads" in e.value.why


def fields_of(args) -> dict:
    """A model-args object's field values, nested ones as dicts (a dataclass or the read table's namespaces)."""
    values = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else vars(args)
    return {k: fields_of(v) if isinstance(v, SimpleNamespace) else v for k, v in values.items() if k != "_enforced"}


@pytest.mark.parametrize("name", [TRAIN_SPEC_NAME, FUSED_TRAIN_SPEC_NAME, "llama3"])
def test_model_args_without_the_model_code_are_the_registrys(name):
    """What the launcher reads (no model import) is, field by field, what the ranks build from."""
    registry = model_lookup.lookup(config(name=name))[0].model_args
    assert list(upstream.llama3_flavors()) == list(registry)
    for flavor, real in registry.items():
        read = model_lookup.model_args(config(name=name, flavor=flavor))
        assert fields_of(read) == fields_of(real) == fields_of(model_lookup.lookup(config(name=name, flavor=flavor))[1])
        assert set(fields_of(read)) == {f.name for f in dataclasses.fields(real)} - {"_enforced"}


def test_model_args_are_a_copy_per_call():
    args = model_lookup.model_args(config(flavor="8B"))
    args.dim, args.rope_scaling_args.scaling_factor = 1, 0.0
    again = model_lookup.model_args(config(flavor="8B"))
    assert (again.dim, again.rope_scaling_args.scaling_factor) == (4096, 8.0)


def test_an_unreadable_table_takes_the_registry(monkeypatch):
    monkeypatch.setattr(upstream, "llama3_flavors", lambda: None)
    args = model_lookup.model_args(config(flavor="8B"))
    assert dataclasses.is_dataclass(args) and (args.dim, args.n_kv_heads) == (4096, 8)
    with pytest.raises(UserError) as e:
        model_lookup.model_args(config(flavor="9000B"))
    assert e.value.setting == "model.flavor" and "8B" in e.value.fix
