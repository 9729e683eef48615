"""ckpt_perf on CPU: the reusable stager survives DCP's per-staging close() (torch 2.11) with its
buffers and copy rules, the staging pool prepared from the start, when install acts, the launcher env."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from torchtitan_runai.config import CheckpointPerf
from torchtitan_runai.training.checkpoint import staging as ckpt_perf


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
    return SimpleNamespace(
        stager=None,
        states={
            "model": Stateful(model),
            "optimizer": Stateful(optim),
            "dataloader": Stateful({"x": 1}),
            "lr_scheduler": None,
        },
    )


def pinned(enable=True, mode="async_with_pinned_mem", load_only=False):
    return SimpleNamespace(enable=enable, async_mode=mode, load_only=load_only)


@pytest.mark.parametrize(
    "cfg", [pinned(enable=False), pinned(mode="async"), pinned(mode="disabled"), pinned(load_only=True)]
)
def test_install_does_nothing_unless_torchtitan_stages_pinned(cfg):
    m = manager()
    assert ckpt_perf.install(m, cfg, model_parts=[Model()], optimizer_name="AdamW") is None
    assert m.stager is None


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(64, 32))
        self.norm = torch.nn.Parameter(torch.ones(32))
        self.register_buffer("freqs", torch.randn(8, 4))
        self.tied = self.w  # the same storage twice is staged once


def test_staging_sizes_are_each_parameter_its_moments_and_the_buffers():
    assert sorted(ckpt_perf.staging_sizes([Model()], moments=2)) == sorted(
        [64 * 32 * 4] * 3 + [32 * 4] * 3 + [8 * 4 * 4]
    )
    assert len(ckpt_perf.staging_sizes([Model()], moments=0)) == 3


def test_staging_sizes_look_inside_a_wrapper_subclass():
    """torchao's float8 weight under FSDP float8 all-gather wraps the data, as TwoTensor does: the
    wrapper's own storage has no data pointer (the 405B recipe's rehearsal died there, issue 22)."""
    from torch.testing._internal.two_tensor import TwoTensor

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(TwoTensor(torch.randn(64, 32), torch.randn(64, 32)))
    assert sorted(ckpt_perf.staging_sizes([model], moments=1)) == [64 * 32 * 4] * 4


def test_pool_prepares_shared_buffers_and_hands_out_exact_sizes():
    pool = ckpt_perf.StagingPool([4096, 128, 128], pin=False).start()
    first = pool.take(128)
    assert first is not None and first.is_shared() and first.nbytes() == 128
    assert pool.take(128) is not None and pool.take(128) is None  # two of them, then DCP allocates
    assert pool.take(999) is None
    assert (pool.taken, pool.missed) == (2, 2) and pool.error is None and pool.seconds is not None


def _rss_shmem_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    pytest.skip("no RssShmem in /proc/self/status")


def test_populate_faults_pages_in_without_changing_the_memory_contract():
    s = ckpt_perf.new_shared_storage(64 << 20)
    before = _rss_shmem_kib()
    ckpt_perf.populate(s.data_ptr(), s.nbytes(), chunk=8 << 20)
    assert _rss_shmem_kib() - before >= 60 * 1024  # the 64 MiB are resident before anything touches them
    t = torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),), (1,))
    t.fill_(7)
    assert int(t[: 1 << 20].sum()) == 7 * (1 << 20) and int(t[-1]) == 7


def test_new_shared_storage_travels_by_file_descriptor_like_torchs_own():
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    s = ckpt_perf.new_shared_storage(1 << 20)
    t = torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),), (1,))
    t.fill_(5)
    buf = io.BytesIO()
    ForkingPickler(buf).dump(t)  # what DCP's saving process is sent
    assert s.is_shared() and len(buf.getvalue()) < 4096  # a handle, not the megabyte
    back = pickle.loads(buf.getvalue())
    t.fill_(9)
    assert int(back[123]) == 9  # the same memory


def test_a_pool_that_cannot_prepare_leaves_stock_behaviour(monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("unable to allocate shared memory")

    monkeypatch.setattr(ckpt_perf, "new_shared_storage", fail)
    pool = ckpt_perf.StagingPool([4096], pin=False).start()
    assert pool.take(4096) is None and isinstance(pool.error, RuntimeError)


def test_first_staging_uses_the_pools_buffers_and_later_ones_reuse_them():
    model = Model()
    sd = {
        "model": {"w": model.w.detach(), "norm": model.norm.detach()},
        "optimizer": {"state.w.exp_avg": torch.zeros_like(model.w), "state.w.step": torch.tensor(3.0)},
        "obj": Plain(5),
    }
    pool = ckpt_perf.StagingPool([64 * 32 * 4, 64 * 32 * 4, 32 * 4], pin=False).start()
    pool._thread.join()
    ready = {s.data_ptr() for free in pool._free.values() for s in free}
    stager = ckpt_perf.build_stager(StagingOptions(False, True, True, False), pool=pool)
    first = torch_2_11_stage(stager, sd)
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert {ptr(first["model"]["w"]), ptr(first["model"]["norm"]), ptr(first["optimizer"]["state.w.exp_avg"])} == ready
    assert pool.taken == 3 and pool.missed == 1  # the 4-byte step counter: DCP's own path
    assert torch.equal(first["model"]["w"], model.w) and first["obj"] == Plain(5)
    with torch.no_grad():
        model.w.add_(1.0)
    second = torch_2_11_stage(stager, sd)
    assert ptr(second["model"]["w"]) == ptr(first["model"]["w"]) and torch.equal(second["model"]["w"], model.w)
    assert pool.taken == 3  # nothing more taken: the stager's cache serves every later save
    stager.close()


def test_install_builds_the_stager_with_a_pool_and_respects_the_switches():
    cpu = lambda pool=None: ckpt_perf.build_stager(StagingOptions(False, True, True, False), pool=pool)  # noqa: E731
    m = manager()
    pool = ckpt_perf.install(m, pinned(), model_parts=[Model()], optimizer_name="AdamW", stager_factory=cpu)
    assert isinstance(pool, ckpt_perf.StagingPool) and len(pool.sizes) == 7 and pool.pin is False  # no CUDA here
    assert type(m.stager).__name__ == "ReusableStager"
    m.stager.close()
    m2 = manager()
    assert (
        ckpt_perf.install(
            m2, pinned(), CheckpointPerf(prepare_at_start=False), model_parts=[Model()], stager_factory=cpu
        )
        is None
    )
    assert type(m2.stager).__name__ == "ReusableStager"  # reuse without the pool
    m2.stager.close()
    m3 = manager()
    ckpt_perf.install(m3, pinned(), CheckpointPerf(reuse_staging=False), stager_factory=cpu)
    assert type(m3.stager).__name__ == "DefaultStager"  # torchtitan's, minus pinning on a CPU
    assert not m3.stager._config.use_pinned_memory
    m3.stager.close()
    m4 = manager()
    mine = cpu_stager()
    m4.stager = mine
    assert ckpt_perf.install(m4, pinned(), stager_factory=cpu) is None and m4.stager is mine
    mine.close()


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


def test_wants_pinned_staging_is_case_insensitive():
    assert ckpt_perf.wants_pinned_staging(pinned(mode="ASYNC_WITH_PINNED_MEM"))


def test_without_dcps_per_storage_hook_no_pool_is_built(monkeypatch):
    from torch.distributed.checkpoint._state_dict_stager import StateDictStager

    monkeypatch.delattr(StateDictStager, "_stage_untyped_storage")
    cpu = lambda pool=None: ckpt_perf.build_stager(StagingOptions(False, True, True, False), pool=pool)  # noqa: E731
    m = manager()
    assert ckpt_perf.install(m, pinned(), model_parts=[Model()], optimizer_name="AdamW", stager_factory=cpu) is None
    assert type(m.stager).__name__ == "ReusableStager"  # the reuse fix still applies


@pytest.fixture
def one_rank_mesh(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def float8_fsdp_model(mesh, seed: int):
    """The 405B recipe's weights in small: float8 linears (emulated on CPU) with FSDP float8
    all-gather, so each parameter is a DTensor whose shard is torchao's WeightWithDynamicFloat8CastTensor."""
    float8 = pytest.importorskip("torchao.float8")
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(64, 16, bias=False))
    config = float8.Float8LinearConfig(enable_fsdp_float8_all_gather=True, emulate=True)
    float8.convert_to_float8_training(model, config=config)
    fully_shard(model, mesh=mesh)
    return model


CPU_ASYNC = StagingOptions(False, True, True, False)  # what a CPU rank stages with (no pinning)
STAGERS = {
    "reusable": lambda model: ckpt_perf.build_stager(CPU_ASYNC),
    "reusable with the pool": lambda model: ckpt_perf.build_stager(
        CPU_ASYNC, pool=ckpt_perf.StagingPool(ckpt_perf.staging_sizes([model], 0), pin=False).start()
    ),
    "torchtitan's (reuse_staging = false)": lambda model: ckpt_perf.stock_stager(CPU_ASYNC),
}


@pytest.mark.parametrize("kind", STAGERS)
def test_float8_weights_are_staged_as_their_values_and_resume(one_rank_mesh, tmp_path, kind):
    """Issue 22: DCP's stager copied a float8 weight as uninitialized host memory, so the 405B
    recipe resumed to loss NaN from any async_with_pinned_mem checkpoint (and its preemption
    checkpoint, staged the same way). Staged, written and loaded back, the weights are the model's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = float8_fsdp_model(one_rank_mesh, seed=0)
    sd = get_model_state_dict(model)
    assert {type(v.to_local()).__name__ for v in sd.values()} == {"WeightWithDynamicFloat8CastTensor"}
    weights = {k: v.to_local()._tensor.clone() for k, v in sd.items()}
    stager = STAGERS[kind](model)
    staged = torch_2_11_stage(stager, {"model": sd})["model"]
    for k, v in staged.items():
        assert type(v.to_local()) is torch.Tensor and torch.equal(v.to_local(), weights[k]), k
    dcp.save(staged, checkpoint_id=str(tmp_path / "step-1"))  # what the saving process writes
    stager.close()

    resumed = float8_fsdp_model(one_rank_mesh, seed=1)
    target = get_model_state_dict(resumed)
    dcp.load(target, checkpoint_id=str(tmp_path / "step-1"))
    set_model_state_dict(resumed, target)
    for k, v in get_model_state_dict(resumed).items():
        assert type(v.to_local()).__name__ == "WeightWithDynamicFloat8CastTensor"  # still float8-trained
        assert torch.equal(v.to_local()._tensor, weights[k]), k


def test_a_wrapper_that_would_be_staged_as_garbage_is_refused():
    from torch.testing._internal.two_tensor import TwoTensor

    class LosesItsClass(TwoTensor):  # as torchao's float8 weight does under DCP's stager: new_empty is plain
        @classmethod
        def __torch_dispatch__(cls, func, types, args, kwargs=None):
            if func is torch.ops.aten.new_empty.default:
                return torch.empty(args[1], dtype=args[0].dtype)
            return super().__torch_dispatch__(func, types, args, kwargs or {})

    w = LosesItsClass(torch.randn(4, 4), torch.randn(4, 4))
    with pytest.raises(TypeError, match="LosesItsClass would be staged as an uninitialized Tensor"):
        ckpt_perf.WrapperSafeStateDictStager().stage({"w": w})
