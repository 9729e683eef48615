"""Reading a float8 run's checkpoint: torchao's classes allowed only when a load refused one."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from torchtitan_runai.checkpoint import subclasses
from torchtitan_runai.errors import UserError

REFUSAL = (
    "Weights only load failed ... WeightsUnpickler error: Unsupported global: GLOBAL "
    "torchao.float8.fsdp_utils.WeightWithDynamicFloat8CastTensor was not an allowed global by default."
)


class CheckpointException(BaseException):
    """DCP's own is a BaseException, not an Exception: the retry must still see it."""


def test_a_load_that_refused_a_torchao_class_runs_again_with_torchao_allowed(monkeypatch):
    calls, allowed = [], []
    monkeypatch.setattr(subclasses, "allow_torchao", lambda: allowed.append(True) or True)

    def load():
        calls.append(1)
        if not allowed:
            raise CheckpointException(pickle.UnpicklingError(REFUSAL).__str__())
        return "weights"

    assert subclasses.load_allowing_torchao(load, "CHECKPOINT_STEP_DIR", "/ck/step-2") == "weights"
    assert len(calls) == 2


def test_without_torchao_it_is_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setattr(subclasses, "allow_torchao", lambda: False)

    def load():
        raise CheckpointException(REFUSAL)

    with pytest.raises(UserError) as error:
        subclasses.load_allowing_torchao(load, "CHECKPOINT_STEP_DIR", "/ck/step-2")
    assert "torchao" in error.value.line() and "pip install torchao" in error.value.line()


def test_other_failures_and_interrupts_pass_through_untouched(monkeypatch):
    monkeypatch.setattr(subclasses, "allow_torchao", lambda: pytest.fail("torchao imported for nothing"))
    for raised in (OSError("disk"), KeyboardInterrupt()):

        def load(raised=raised):
            raise raised

        with pytest.raises(type(raised)):
            subclasses.load_allowing_torchao(load, "CHECKPOINT_STEP_DIR", "/ck")


def _config(tmp_path, converters=(), initial="", in_hf=False, enable=True):
    return SimpleNamespace(
        job=SimpleNamespace(dump_folder=str(tmp_path)),
        model=SimpleNamespace(converters=list(converters)),
        checkpoint=SimpleNamespace(
            enable=enable, folder="checkpoint", initial_load_path=initial, initial_load_in_hf=in_hf
        ),
    )


def test_the_ranks_import_torchao_only_to_read_a_dcp_checkpoint_without_float8(monkeypatch, tmp_path):
    imported = []
    monkeypatch.setattr(subclasses, "allow_torchao", lambda: imported.append(1) or True)
    assert not subclasses.allow_on_ranks(_config(tmp_path))  # fresh, nothing to read
    assert not subclasses.allow_on_ranks(_config(tmp_path, initial="/hf", in_hf=True))  # safetensors: plain
    assert not subclasses.allow_on_ranks(_config(tmp_path, ["quantize.linear.float8"], initial="/ck"))
    assert not subclasses.allow_on_ranks(_config(tmp_path, initial="/ck", enable=False))
    assert imported == []
    assert subclasses.allow_on_ranks(_config(tmp_path, initial="/ck/step-2"))  # a DCP initial load
    (tmp_path / "checkpoint" / "step-4").mkdir(parents=True)
    assert subclasses.allow_on_ranks(_config(tmp_path))  # a resume
    assert len(imported) == 2
