"""ckpt_perf on CPU: when the prestager installs, that it stages once through the stager the saves
use (and that DCP then reuses the staged buffers), the torch 2.11 class-copy fix, the launcher env."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from torchtitan_runai import ckpt_perf


def cpu_stager():
    # pinned memory needs CUDA; shared memory + async staging are what the saves use, on CPU
    return DefaultStager(StagingOptions(False, True, True, False))


class Stateful:
    def __init__(self, sd):
        self.sd = sd

    def state_dict(self):
        return self.sd


def manager(**tensors):
    model = {"w": torch.randn(64, 32)}
    optim = {"state.w.exp_avg": torch.randn(64, 32), "state.w.step": torch.tensor(3.0)}
    return SimpleNamespace(stager=None, states={"model": Stateful(model), "optimizer": Stateful(optim),
                                                "dataloader": Stateful({"x": 1}), "lr_scheduler": None})


def pinned(enable=True, mode="async_with_pinned_mem", load_only=False):
    return SimpleNamespace(enable=enable, async_mode=mode, load_only=load_only)


@pytest.mark.parametrize("cfg", [pinned(enable=False), pinned(mode="async"), pinned(mode="disabled"),
                                 pinned(load_only=True)])
def test_install_does_nothing_unless_torchtitan_stages_pinned(cfg):
    m = manager()
    assert ckpt_perf.StagingPrewarmer.install(m, cfg, stager_factory=cpu_stager) is None
    assert m.stager is None


def test_install_off_by_config():
    m = manager()
    assert ckpt_perf.StagingPrewarmer.install(m, pinned(), ckpt_perf.CheckpointPerf(prestage=False),
                                              stager_factory=cpu_stager) is None


def test_install_sets_the_stager_torchtitan_will_use_and_keeps_an_existing_one():
    m = manager()
    p = ckpt_perf.StagingPrewarmer.install(m, pinned(), stager_factory=cpu_stager)
    assert isinstance(m.stager, DefaultStager)
    mine = cpu_stager()
    m2 = manager()
    m2.stager = mine
    ckpt_perf.StagingPrewarmer.install(m2, pinned(), stager_factory=cpu_stager)
    assert m2.stager is mine
    m.stager.close()
    mine.close()
    assert p.after_step_n == 1


def test_prestages_once_after_the_step_and_the_save_reuses_its_buffers():
    m = manager()
    p = ckpt_perf.StagingPrewarmer.install(m, pinned(), ckpt_perf.CheckpointPerf(prestage_after_step=2),
                                           stager_factory=cpu_stager)
    assert p.after_step(1) is False and p.future is None  # optimizer state may not exist yet
    assert p.after_step(2) is True
    assert p.after_step(3) is False  # once
    first = p.future.result(timeout=30)
    p.wait(timeout=30)
    assert p.seconds is not None and p.error is None
    assert set(first) == {"model", "optimizer"}  # the big state only; the rest is tiny
    w_gpu = m.states["model"].sd["w"]
    assert torch.equal(first["model"]["w"], w_gpu) and first["model"]["w"].is_shared()
    # what a later save stages (same tensors, new values) lands in the same host buffers
    w_gpu.add_(1.0)
    again = m.stager.stage({"model": m.states["model"].state_dict()}).result(timeout=30)
    assert again["model"]["w"].untyped_storage().data_ptr() == first["model"]["w"].untyped_storage().data_ptr()
    assert torch.equal(again["model"]["w"], w_gpu)
    m.stager.close()


def test_a_failing_stager_leaves_stock_behaviour():
    class Broken:
        def stage(self, sd):
            raise RuntimeError("no pinned memory")

    m = manager()
    m.stager = Broken()
    p = ckpt_perf.StagingPrewarmer.install(m, pinned())
    assert p.after_step(1) is False
    assert isinstance(p.error, RuntimeError)
    assert p.after_step(2) is False


@dataclasses.dataclass
class Plain:  # any plain object in a state dict: reduced by deepcopy to (cls, ...)
    a: int = 1


def test_class_copy_fix_for_torch_2_11_staging():
    stager = DefaultStager(StagingOptions(False, False, False, False))
    table = stager._state_dict_stager._deepcopy_dispatch
    table.pop(type, None)  # torch 2.11's table (newer torch has the rule; then the fix is a no-op)
    sd = {"t": torch.ones(3), "obj": Plain(5)}
    with pytest.raises(KeyError):
        stager.stage(sd)
    assert ckpt_perf.patch_class_copy(stager) is True
    out = stager.stage(sd)
    assert out["obj"] == Plain(5) and torch.equal(out["t"], sd["t"])
    assert ckpt_perf.patch_class_copy(stager) is False  # already there
    assert ckpt_perf.patch_class_copy(object()) is False  # not a DCP stager: left alone


def test_startup_env_puts_the_compile_cache_on_the_output_volume():
    env = ckpt_perf.startup_env("/out/run1", {})
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/out/run1/.cache/inductor"
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and env["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    assert env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"


def test_startup_env_never_overrides_the_user():
    env = ckpt_perf.startup_env("/out", {"TORCHINDUCTOR_CACHE_DIR": "/mine", "PYTORCH_CUDA_ALLOC_CONF": "x"})
    assert "TORCHINDUCTOR_CACHE_DIR" not in env and "PYTORCH_ALLOC_CONF" not in env


def test_wants_prestaging_is_case_insensitive():
    assert ckpt_perf.wants_prestaging(pinned(mode="ASYNC_WITH_PINNED_MEM"))
