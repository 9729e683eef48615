"""bench.trace_summary: GPU time of a profiled step split by kernel family, idle time from overlaps."""

from bench.trace_summary import family, summarize, union_length


def k(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_families_of_h100_kernel_names():
    assert family("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "kernel") == "matmul"
    assert family("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNN", "kernel") == "matmul"
    assert family("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "kernel") == "attention"
    assert family("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "kernel") == "triton reduction"
    assert family("triton_poi_fused_mul_silu_1", "kernel") == "triton pointwise"
    assert (
        family("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdam>", "kernel") == "optimizer"
    )
    assert family("triton_poi_fused__fused_rms_norm__scaled_mm__to_copy_add_clamp_1", "kernel") == "triton pointwise"
    assert family("triton_tem_fused_mm_0", "kernel") == "matmul"
    assert family("Memcpy DtoD (Device -> Device)", "gpu_memcpy") == "copy/cast"


def test_union_counts_overlaps_once():
    assert union_length([(0, 10), (5, 15), (20, 30)]) == 25


def test_summary_shares_and_idle_time():
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#10", "ts": 0, "dur": 1000},
            k("sm90_xmma_gemm_bf16", 0, 600),
            k("triton_poi_fused_mul_silu_1", 600, 100),
            k("cudnn_generated_fort_native_sdpa", 800, 200),  # 100 us idle before it
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5},
        ]
    }
    s = summarize(trace)
    assert s["step_ms"] == 1.0 and s["gpu_busy_ms"] == 0.9
    assert s["gpu_idle_in_span_pct"] == 10.0
    assert s["kernel_pct_by_family"] == {"matmul": 66.67, "attention": 22.22, "triton pointwise": 11.11}
    assert s["top_kernels"][0]["name"] == "sm90_xmma_gemm_bf16"
