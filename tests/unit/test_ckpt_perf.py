"""ckpt_perf on CPU: the reusable stager survives DCP's per-staging close() (torch 2.11) with its
buffers and copy rules, when install acts, the opt-in prewarmer, the launcher env."""

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
    assert ckpt_perf.StagingPrewarmer.install(m, cfg, ON, stager_factory=cpu_stager) is None
    assert ckpt_perf.install(m, cfg, ON, stager_factory=cpu_stager) is None
    assert m.stager is None


def test_prewarmer_off_by_default():
    m = manager()
    assert ckpt_perf.StagingPrewarmer.install(m, pinned(), stager_factory=cpu_stager) is None


ON = ckpt_perf.CheckpointPerf(prestage=True)


def test_install_sets_the_stager_torchtitan_will_use_and_keeps_an_existing_one():
    m = manager()
    p = ckpt_perf.StagingPrewarmer.install(m, pinned(), ON, stager_factory=cpu_stager)
    assert isinstance(m.stager, DefaultStager)
    mine = cpu_stager()
    m2 = manager()
    m2.stager = mine
    ckpt_perf.StagingPrewarmer.install(m2, pinned(), ON, stager_factory=cpu_stager)
    assert m2.stager is mine
    m.stager.close()
    mine.close()
    assert p.after_step_n == 1


def test_prestages_once_after_the_step_and_the_save_reuses_its_buffers():
    m = manager()
    p = ckpt_perf.StagingPrewarmer.install(m, pinned(), ckpt_perf.CheckpointPerf(prestage=True, prestage_after_step=2),
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
    p = ckpt_perf.StagingPrewarmer.install(m, pinned(), ON)
    assert p.after_step(1) is False
    assert isinstance(p.error, RuntimeError)
    assert p.after_step(2) is False


@dataclasses.dataclass
class Plain:  # any plain object in a state dict: deep-copied through (cls, ...)
    a: int = 1


def torch_2_11_stage(stager, sd):
    """What torch 2.11's DefaultStager._stage does: stage, then close the inner StateDictStager."""
    out = stager.stage(sd)
    out = out.result(timeout=30) if hasattr(out, "result") else out
    stager._state_dict_stager.close()
    return out


def test_stock_stager_breaks_on_the_second_staging_after_close():
    stager = DefaultStager(StagingOptions(False, True, False, False))
    sd = {"t": torch.ones(3), "obj": Plain(5), "meta": {"step": 3}}
    torch_2_11_stage(stager, sd)
    with pytest.raises(KeyError):  # KeyError: <class 'type'>, as seen on the GPU with torch 2.11
        torch_2_11_stage(stager, sd)


def test_reusable_stager_keeps_buffers_and_copy_rules_across_stagings():
    stager = ckpt_perf.build_stager(StagingOptions(False, True, True, False))
    w = torch.randn(16, 8)
    sd = {"model": {"w": w}, "obj": Plain(5), "meta": {"step": 3}}
    first = torch_2_11_stage(stager, sd)
    w.add_(1.0)
    second = torch_2_11_stage(stager, sd)
    assert second["obj"] == Plain(5) and second["meta"] == {"step": 3}
    assert torch.equal(second["model"]["w"], w) and second["model"]["w"].is_shared()
    # same host buffer both times: the (pinned, on GPU) allocation is paid once per run
    assert second["model"]["w"].untyped_storage().data_ptr() == first["model"]["w"].untyped_storage().data_ptr()
    stager.close()  # end of run: released for real
    assert len(stager._state_dict_stager._cached_storage_mapping) == 0


def test_install_sets_the_reusable_stager_only_in_pinned_mode():
    m = manager()
    assert ckpt_perf.install(m, pinned(mode="async"), stager_factory=cpu_stager) is None and m.stager is None
    cpu_reusable = lambda: ckpt_perf.build_stager(StagingOptions(False, True, True, False))  # noqa: E731
    assert ckpt_perf.install(m, pinned(), stager_factory=cpu_reusable) is None  # no prewarmer by default ...
    assert type(m.stager).__name__ == "ReusableStager"  # ... but the stager is ours
    m.stager.close()
    m2 = manager()
    ckpt_perf.install(m2, pinned(), ckpt_perf.CheckpointPerf(reuse_staging=False), stager_factory=cpu_reusable)
    assert m2.stager is None  # torchtitan builds its own
    m3 = manager()
    p = ckpt_perf.install(m3, pinned(), ckpt_perf.CheckpointPerf(prestage=True), stager_factory=cpu_stager)
    assert isinstance(p, ckpt_perf.StagingPrewarmer)
    m3.stager.close()


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
