"""Bench-only plug-in, loaded by torchtitan through ``--experimental.custom_import bench.proxy``.

It registers what the benchmark needs and torchtitan has no command line for:

* model flavors in llama3's flavor table (``llama3_args``, shared by the stock "llama3" spec):
  ``8B_proxy8`` = Llama 3.1 8B shape truncated to 8 layers (2.80 B parameters, FSDP-free on one
  GPU), ``8B_proxy4`` (4 layers, 1.92 B: ``bench.preemption``) and ``toy`` (for the CPU smoke mode);
* the train spec ``llama3_bench_ours``: stock llama3 with this fork's model class
  (``FusedHeadTransformer``) and loss builder; the loss variant comes from ``BENCH_LOSS``
  (plain | chunked | fused) and ``BENCH_LOSS_CHUNK``, so the harness can isolate each lever with
  the stock Trainer;
* on a machine without CUDA, torchtitan's device globals are pointed at the CPU (gloo);
* at exit, the process's peak CUDA memory counters are written to ``BENCH_MEM_OUT`` (JSON), since
  torchtitan logs only max_reserved.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os

import torch

from torchtitan_runai.training import device
from torchtitan_runai.upstream import get_train_spec, llama3, register_train_spec

PROXY_FLAVOR = "8B_proxy8"
PROXY4_FLAVOR = "8B_proxy4"  # bench.preemption: a 23 GB full checkpoint on one GPU
TOY_FLAVOR = "toy"
BENCH_SPEC = "llama3_bench_ours"


def proxy_args():
    """Llama 3.1 8B with 8 of its 32 layers."""
    return dataclasses.replace(llama3.llama3_args["8B"], n_layers=8)


def proxy4_args():
    """Llama 3.1 8B with 4 of its 32 layers (1.92 B parameters)."""
    return dataclasses.replace(llama3.llama3_args["8B"], n_layers=4)


def toy_args():
    return llama3.TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048, rope_theta=500000)


def register() -> None:
    flavors = llama3.llama3_args
    flavors.setdefault(PROXY_FLAVOR, proxy_args())
    flavors.setdefault(PROXY4_FLAVOR, proxy4_args())
    flavors.setdefault(TOY_FLAVOR, toy_args())
    try:
        get_train_spec(BENCH_SPEC)
        return
    except ValueError:
        pass
    from torchtitan_runai.training.fused_head import FusedHeadTransformer
    from torchtitan_runai.training.loss import build_loss

    variant = os.environ.get("BENCH_LOSS", "fused")
    chunk = int(os.environ.get("BENCH_LOSS_CHUNK", "8192"))
    stock = get_train_spec("llama3")
    register_train_spec(
        BENCH_SPEC,
        dataclasses.replace(
            stock,
            model_cls=FusedHeadTransformer if variant == "fused" else stock.model_cls,
            build_loss_fn=lambda job_config, **kw: build_loss(variant, chunk, job_config),
        ),
    )


_PEAKS = {"active_bytes.all.peak": 0, "allocated_bytes.all.peak": 0, "reserved_bytes.all.peak": 0}


def _record_peaks() -> None:
    stats = torch.cuda.memory_stats()
    for key in _PEAKS:
        _PEAKS[key] = max(_PEAKS[key], stats.get(key, 0))


def _track_peaks_across_resets() -> None:
    """torchtitan resets CUDA peak stats at every log step; keep the run's maxima (bench only)."""
    reset = torch.cuda.reset_peak_memory_stats

    def recording_reset(*args, **kwargs):
        _record_peaks()
        return reset(*args, **kwargs)

    torch.cuda.reset_peak_memory_stats = recording_reset


def _dump_memory(path: str) -> None:
    if not torch.cuda.is_available() or int(os.environ.get("RANK", "0")) != 0:
        return
    _record_peaks()
    gib = 1024**3
    record = {
        "max_active_gib": _PEAKS["active_bytes.all.peak"] / gib,
        "max_allocated_gib": _PEAKS["allocated_bytes.all.peak"] / gib,
        "max_reserved_gib": _PEAKS["reserved_bytes.all.peak"] / gib,
        "num_alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
        "note": "maxima over the whole run (torchtitan's per-interval resets bridged)",
    }
    with open(path, "w") as f:
        json.dump(record, f)


register()
device.select_device()  # CUDA if present, else CPU/gloo (torchtitan would insist on CUDA)
if os.environ.get("BENCH_MEM_OUT") and torch.cuda.is_available():
    _track_peaks_across_resets()
    atexit.register(_dump_memory, os.environ["BENCH_MEM_OUT"])
