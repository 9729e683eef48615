"""Split one profiled training step's GPU time by kernel family (torchtitan's chrome trace).

Answers "where do the ~29% below the matmul ceiling go" (docs/performance.md) with measured shares:
matmuls, attention, Inductor/Triton fused element-wise and reduction kernels, optimizer, copies,
and the GPU's idle time inside the step.

    python -m bench.trace_summary TRACE.json [--out summary.json]

The trace comes from torchtitan's own profiler (``--profiling.enable_profiling``); see
``bench.throughput --set profile``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

FAMILIES = [  # first match wins; names as CUDA/cuBLAS/cuDNN/Triton report them on H100
    ("attention", re.compile(r"sdpa|fmha|flash|attention|cudnn", re.I)),
    ("matmul", re.compile(r"^triton_tem_", re.I)),  # Inductor's matmul templates
    ("triton reduction", re.compile(r"^triton_(red|per)_", re.I)),
    # Inductor names a kernel after the ops fused into it: "triton_poi_..._scaled_mm_..." is float8's
    # cast feeding a matmul, not the matmul
    ("triton pointwise", re.compile(r"^triton_", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|sm90_|Kernel2|scaled_mm|matmul", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|lerp", re.I)),
    ("copy/cast", re.compile(r"copy|memcpy|memset|cast|convert|elementwise_kernel|vectorized", re.I)),
]


def family(name: str, cat: str) -> str:
    if cat in ("gpu_memcpy", "gpu_memset"):
        return "copy/cast"
    for fam, rx in FAMILIES:
        if rx.search(name):
            return fam
    return "other"


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(trace: dict, top: int = 25) -> dict:
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    steps = [e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("ProfilerStep#")]
    if not kernels:
        raise SystemExit("no GPU kernels in this trace (was it taken on a GPU with CUDA activity?)")
    k0 = min(e["ts"] for e in kernels)
    k1 = max(e["ts"] + e["dur"] for e in kernels)
    by_family: dict[str, float] = defaultdict(float)
    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_family[family(e["name"], e["cat"])] += e["dur"]
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
    busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    span = k1 - k0
    step_us = max((e["dur"] for e in steps), default=span)
    fam_total = sum(by_family.values())
    return {
        "step_ms": round(step_us / 1e3, 2),
        "gpu_span_ms": round(span / 1e3, 2),
        "gpu_busy_ms": round(busy / 1e3, 2),
        "gpu_idle_in_span_pct": round(100 * (1 - busy / span), 2) if span else None,
        "kernel_ms_by_family": {k: round(v / 1e3, 2) for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
        "kernel_pct_by_family": {
            k: round(100 * v / fam_total, 2) for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])
        },
        "top_kernels": [
            {"name": n[:160], "ms": round(v[0] / 1e3, 3), "count": v[1], "family": family(n, "kernel")}
            for n, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    summary = summarize(json.loads(Path(a.trace).read_text()))
    text = json.dumps(summary, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
