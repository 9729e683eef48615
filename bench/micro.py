"""Kernel-level checks behind the levers (GPU only): attention backends and the loss head.

    python -m bench.micro --out DIR

* SDPA on the proxy's attention shape (32 query heads, 8 KV heads, head dim 128, seq 8192, causal):
  cuDNN vs FlashAttention, with ``enable_gqa`` (what torchtitan passes) and with KV repeated.
* Output layer + loss, forward+backward, 16,384 tokens x 4096 x 128,256: the plain compiled loss on
  full logits against the fused chunked head; time and peak memory above the inputs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn, iters=10, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def attention(results: dict) -> None:
    b, hq, hkv, s, d = 2, 32, 8, 8192, 128
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flops = 3.5 * 4 * b * hq * s * s * d / 2  # causal: half of the full QK^T and PV, fwd + bwd
    for name, backends in (
        ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
        ("flash", [SDPBackend.FLASH_ATTENTION]),
        ("torchtitan_order", [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]),
    ):
        for gqa in (True, False):

            def step():
                kk, vv = (k, v) if gqa else (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
                with sdpa_kernel(backends, set_priority=True):
                    out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                out.sum().backward()

            key = f"sdpa_{name}_{'gqa' if gqa else 'repeat_kv'}"
            try:
                ms = bench(step)
                results[key] = {"ms": ms, "tflops": flops / ms / 1e9}
            except Exception as e:  # a backend may refuse a shape
                results[key] = {"error": str(e).splitlines()[0][:200]}
            print(key, results[key], flush=True)


def loss_head(results: dict) -> None:
    from torchtitan_runai.training.fused_head import HeadInput, ce_sum_and_grad, fused_linear_cross_entropy
    from torchtitan_runai.upstream import cross_entropy_loss

    n, dim, vocab = 16384, 4096, 128256
    h = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, dim, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_(True)
    y = torch.randint(0, vocab, (n,), device="cuda")
    plain = torch.compile(cross_entropy_loss)  # the plain loss: torchtitan's, on [1, n, vocab] logits
    ce = torch.compile(ce_sum_and_grad)
    variants = {"plain_compiled": lambda: plain((h @ w.t()).unsqueeze(0), y.unsqueeze(0))}
    for chunk in (4096, 8192, 16384):
        variants[f"fused_chunk{chunk}"] = lambda c=chunk: fused_linear_cross_entropy(
            HeadInput(h, w), y, chunk_tokens=c, ce_fn=ce
        )
    for name, fn in variants.items():

        def step():
            h.grad = w.grad = None
            (fn() / n).backward()

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = bench(step)
        results[f"head_{name}"] = {"ms": ms, "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
        print(name, results[f"head_{name}"], flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results")
    a = p.parse_args()
    results = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    attention(results)
    loss_head(results)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, f"{results['date']}-micro.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
