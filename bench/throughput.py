"""Throughput harness: stock torchtitan 0.2.2 (swept) against this fork's levers, one process each.

Usage (GPU machine, repository root, torchtitan importable):

    python -m bench.throughput --mode gpu --out bench/results --set main
    python -m bench.throughput --mode cpu --out /tmp/bench-cpu          # toy size, ~1 min, no GPU

Every configuration is a fresh ``torchrun --standalone --nproc_per_node 1 -m torchtitan.train`` on
the 8-layer Llama 3.1 8B proxy (``bench.proxy``), seq_len 8192, generated corpus and BPE tokenizer
(``bench.assets``). "stock" rows use torchtitan's own ``llama3`` train spec and loss; "ours" rows
use the spec ``llama3_bench_ours`` = stock + this fork's model class and loss (``BENCH_LOSS``).
From torchtitan's log lines we take tok/s and MFU (mean of the logging intervals after warm-up),
max_reserved memory, and the wall time from launch to the first step's log line; ``bench.proxy``
adds peak active/allocated/reserved memory at exit. Results go to ``<out>/<date>-<machine>.json``
and ``.md`` after every configuration, so a run cut short still leaves its rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.assets import build_all
from bench.child import child_env, run_torchrun

LOG_RE = re.compile(
    r"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>[-\d.naife]+)(?:.*?memory:\s*(?P<mem>[\d.]+GiB|n/a))?.*?"
    r"tps:\s*(?P<tps>[\d,]+)(?:.*?tflops:\s*(?P<tflops>[\d.]+))?(?:.*?mfu:\s*(?P<mfu>[\d.]+%|n/a))?"
)
"""A step line; ours on CPU leaves out memory, tflops and mfu (and stock prints n/a): they read 0."""


@dataclass
class Config:
    name: str
    group: str  # "stock" | "ours" (bench spec on stock's Trainer) | "recipe" (train.py + llama3_8b.toml)
    lbs: int
    ac: str = "none"  # none | op | full | layer<N> (checkpoint every N-th block)
    float8: bool = False
    compile: bool = True
    loss: str = "plain"  # ours only: plain | chunked | fused
    env: dict = field(default_factory=dict)
    extra: list = field(default_factory=list)

    @property
    def precision(self) -> str:
        return "float8" if self.float8 else "bf16"


def C(name, group, lbs, ac="none", float8=False, **kw) -> Config:
    return Config(name, group, lbs, ac, float8, **kw)


PROFILE = [
    "--profiling.enable_profiling",
    "--profiling.profile_freq",
    "10",
    "--profiling.profiler_warmup",
    "3",
    "--profiling.profiler_active",
    "1",
    "--profiling.save_traces_folder",
    "profile_traces",
]
ALLOC = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}  # what torchtitan's run_train.sh sets

SETS: dict[str, list[Config]] = {
    # stock's sweep (batch, AC, compile) and our levers, each lever isolated on top of stock
    "main": [  # most informative first: a call cut short still answers the main question
        C("stock-bf16-lbs2-noac", "stock", 2),
        C("ours-bf16-lbs2-noac-fused", "ours", 2, loss="fused"),
        C("ours-bf16-lbs3-noac-fused", "ours", 3, loss="fused"),
        C("stock-f8-lbs4-op", "stock", 4, "op", True),
        C("ours-f8-lbs4-op-fused", "ours", 4, "op", True, loss="fused"),
        C("ours-f8-lbs4-layer4-fused", "ours", 4, "layer4", True, loss="fused"),
        C("ours-bf16-lbs4-layer4-fused", "ours", 4, "layer4", loss="fused"),
        C("ours-f8-lbs3-noac-fused", "ours", 3, "none", True, loss="fused"),
        C("stock-f8-lbs2-noac", "stock", 2, "none", True),
        C("stock-bf16-lbs4-op", "stock", 4, "op"),
        C("stock-bf16-lbs1-op", "stock", 1, "op"),
    ],
    "f8": [  # second pass: float8, stock bf16 at lbs 3, repeat of our best bf16
        C("stock-f8-lbs4-op", "stock", 4, "op", True),
        C("ours-f8-lbs4-op-fused", "ours", 4, "op", True, loss="fused"),
        C("ours-f8-lbs4-layer4-fused", "ours", 4, "layer4", True, loss="fused"),
        C("ours-f8-lbs3-noac-fused", "ours", 3, "none", True, loss="fused"),
        C("stock-bf16-lbs3-noac", "stock", 3),
        C("stock-f8-lbs2-noac", "stock", 2, "none", True),
        C("stock-f8-lbs3-noac", "stock", 3, "none", True),
        C("ours-bf16-lbs3-noac-fused", "ours", 3, loss="fused"),
    ],
    "f8lbs4": [  # third pass: does the fused head's memory buy float8 lbs 4 without AC?
        C("ours-f8-lbs4-noac-fused", "ours", 4, "none", True, loss="fused"),
        C("stock-f8-lbs4-noac", "stock", 4, "none", True),
        C("stock-f8-lbs3-noac", "stock", 3, "none", True),
        C("ours-f8-lbs4-noac-fused-c16k", "ours", 4, "none", True, loss="fused", env={"BENCH_LOSS_CHUNK": "16384"}),
    ],
    "profile": [  # one profiled step (torchtitan's profiler, step 10) of stock's best: bench.trace_summary
        C("stock-bf16-lbs3-noac-prof", "stock", 3, extra=PROFILE),
        C("stock-f8-lbs4-noac-prof", "stock", 4, "none", True, extra=PROFILE),
    ],
    "recipe": [  # the shipped 8B recipe through train.py beside stock's best, same call
        C("stock-bf16-lbs3-noac", "stock", 3),
        C("recipe-bf16-lbs3-noac", "recipe", 3),
        C("stock-f8-lbs4-noac", "stock", 4, "none", True),
        C("recipe-f8-lbs4-noac", "recipe", 4, "none", True),
    ],
    "cpu": [
        C("stock-toy", "stock", 2, compile=False),
        C("recipe-toy", "recipe", 2, compile=False),
        C("ours-toy-fused", "ours", 2, compile=False, loss="fused"),
        C("ours-toy-chunked", "ours", 2, compile=False, loss="chunked"),
    ],
}


RECIPE = "train_configs/llama3_8b.toml"


def train_args(cfg: Config, mode: str, corpus: Path, tok: Path, dump: Path, steps: int) -> list[str]:
    """torchtitan's flags for one run. ``recipe`` rows are the shipped 8B recipe through this fork's
    ``train.py`` (its Trainer, spec and config sections), with only the proxy's shape, data, batch
    and AC set here; the other rows are torchtitan's own ``torchtitan.train``."""
    gpu = mode == "gpu"
    recipe = ["--job.config_file", RECIPE, "--metrics.no-enable-tensorboard"] if cfg.group == "recipe" else []
    model = [] if cfg.group == "recipe" else ["--model.name", "llama3" if cfg.group == "stock" else "llama3_bench_ours"]
    args = [
        *recipe,
        "--job.dump_folder",
        str(dump),
        "--experimental.custom_import",
        "bench.proxy",
        *model,
        "--model.flavor",
        "8B_proxy8" if gpu else "toy",
        "--model.hf_assets_path",
        str(tok),
        "--training.dataset",
        "c4_test",
        "--training.dataset_path",
        str(corpus),
        "--training.seq_len",
        "8192" if gpu else "256",
        "--training.local_batch_size",
        str(cfg.lbs),
        "--training.steps",
        str(steps),
        "--lr_scheduler.warmup_steps",
        "2",
        "--metrics.log_freq",
        "5" if gpu else "1",
        "--metrics.disable_color_printing",
        "--checkpoint.no-enable",
        "--debug.seed",
        "42",
    ]
    if cfg.ac.startswith("layer"):
        args += [
            "--activation_checkpoint.mode",
            "selective",
            "--activation_checkpoint.selective_ac_option",
            cfg.ac[len("layer") :],
        ]
    elif cfg.ac == "op":
        args += ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"]
    else:
        args += ["--activation_checkpoint.mode", cfg.ac]
    args += ["--compile.enable"] if cfg.compile else ["--compile.no-enable"]
    if cfg.float8:
        args += ["--model.converters", "quantize.linear.float8", "--quantize.linear.float8.filter_fqns", "output"]
    return args + list(cfg.extra)


def run_one(cfg: Config, mode: str, corpus: Path, tok: Path, work: Path, steps: int, timeout: float) -> dict:
    dump = work / cfg.name
    dump.mkdir(parents=True, exist_ok=True)
    mem_json = dump / "memory.json"
    mem_json.unlink(missing_ok=True)
    env = child_env(BENCH_MEM_OUT=str(mem_json), BENCH_LOSS=cfg.loss, **(ALLOC if mode == "gpu" else {}), **cfg.env)
    entry = ["train.py"] if cfg.group == "recipe" else ["-m", "torchtitan.train"]
    rows: list[dict] = []
    first: list[float] = []

    def on_line(line: str, now: float) -> None:
        m = LOG_RE.search(line)
        if m:
            first.append(now)
            rows.append(
                {
                    k: 0.0 if v in (None, "n/a") else float(v.replace(",", "").rstrip("GiB%"))
                    for k, v in m.groupdict().items()
                }
            )

    child = run_torchrun([*entry, *train_args(cfg, mode, corpus, tok, dump, steps)], env, timeout, on_line)
    lines, wall, status = child.lines, child.wall_s, child.status
    first_step_s = first[0] if first else None
    (dump / "log.txt").write_text("\n".join(lines))
    if status.startswith("exit") and "out of memory" in "\n".join(lines[-400:]).lower():
        status = "oom"
    warm = [r for r in rows if r["step"] > (5 if mode == "gpu" else 1)] or rows[-1:]
    result = {
        **dataclasses.asdict(cfg),
        "precision": cfg.precision,
        "status": status,
        "tps": sum(r["tps"] for r in warm) / len(warm) if warm else None,
        "mfu": sum(r["mfu"] for r in warm) / len(warm) if warm else None,
        "max_reserved_logged_gib": max((r["mem"] for r in rows), default=None),
        "final_loss": rows[-1]["loss"] if rows else None,
        "first_step_s": first_step_s,
        "wall_s": wall,
        "intervals": rows,
    }
    if mem_json.exists():
        result["memory"] = json.loads(mem_json.read_text())
    if status != "ok":
        result["log_tail"] = lines[-25:]
    return result


def versions() -> dict:
    info = {"python": platform.python_version(), "host": platform.node()}
    for mod in ("torch", "torchtitan", "torchao", "triton"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod)
        except Exception:
            info[mod] = None
    try:
        import torch

        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["nvidia_smi"] = smi.stdout.strip()
    except Exception:
        pass
    return info


def summarize(results: list[dict]) -> dict:
    """Per precision: stock's best against the best of this fork's rows (bench spec or recipe)."""
    ok = [r for r in results if r["status"] == "ok" and r["tps"]]
    out = {}
    for prec in ("bf16", "float8"):

        def best(groups):
            return max(
                (r for r in ok if r["group"] in groups and r["precision"] == prec), key=lambda r: r["tps"], default=None
            )

        stock, ours = best(("stock",)), best(("ours", "recipe"))
        if stock and ours:
            out[prec] = {
                "stock_best": stock["name"],
                "ours_best": ours["name"],
                "stock_tps": stock["tps"],
                "ours_tps": ours["tps"],
                "ratio": ours["tps"] / stock["tps"],
            }
    return out


def to_markdown(meta: dict, results: list[dict], summary: dict) -> str:
    lines = [
        f"# Throughput: {meta['date']} on {meta['machine']}",
        "",
        "Proxy: Llama 3.1 8B shape, 8 layers (2.80 B params), seq_len 8192, one GPU, AdamW, "
        "bf16 autocast; `stock` = torchtitan 0.2.2 as shipped, `ours` = this fork's model/loss. "
        "**Proxy results** (1 GPU, 8 layers): not a claim about the 2x8-GPU recipes.",
        "",
        "Software: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v),
        "",
        "| config | group | prec | lbs | AC | compile | loss | status | tok/s | MFU % | max reserved GiB | "
        "max active GiB | first step s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        mem = r.get("memory", {})
        fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['name']} | {r['group']} | {r['precision']} | {r['lbs']} | {r['ac']} | {r['compile']} | "
            f"{r['loss']} | {r['status']} | {fmt(r['tps'], '{:,.0f}')} | {fmt(r['mfu'], '{:.1f}')} | "
            f"{fmt(mem.get('max_reserved_gib'), '{:.1f}')} | {fmt(mem.get('max_active_gib'), '{:.1f}')} | "
            f"{fmt(r['first_step_s'], '{:.1f}')} |"
        )
    lines += ["", "## Best per precision", ""]
    for prec, s in summary.items():
        lines.append(
            f"- {prec}: ours `{s['ours_best']}` {s['ours_tps']:,.0f} tok/s vs stock "
            f"`{s['stock_best']}` {s['stock_tps']:,.0f} tok/s: **{s['ratio']:.3f}x**"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--set", default=None, help=f"configuration set: {sorted(SETS)}")
    p.add_argument("--only", default="", help="comma-separated config names to run")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--work", default="/tmp/bench-work")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting runs after this")
    p.add_argument("--per-run-timeout-s", type=float, default=240)
    p.add_argument("--tag", default="throughput")
    a = p.parse_args(argv)
    configs = SETS[a.set or ("main" if a.mode == "gpu" else "cpu")]
    if a.only:
        wanted = a.only.split(",")
        configs = [c for c in configs if c.name in wanted]
    steps = a.steps or (20 if a.mode == "gpu" else 4)
    work = Path(a.work)
    corpus, tok = build_all(work / "assets")
    meta = {"date": dt.date.today().isoformat(), "versions": versions(), "mode": a.mode, "steps": steps}
    meta["machine"] = meta["versions"].get("gpu") or platform.machine()
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", meta["machine"]).strip("-")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{meta['date']}-{slug}-{a.tag}"
    began, results = time.monotonic(), []
    for cfg in configs:
        left = a.budget_s - (time.monotonic() - began)
        if left < 45:
            print(f"skip {cfg.name}: budget", flush=True)
            continue
        r = run_one(cfg, a.mode, corpus, tok, work, steps, min(a.per_run_timeout_s, left))
        results.append(r)
        print(
            f"{r['name']:32s} {r['status']:8s} tps={r['tps'] or 0:9,.0f} mfu={r['mfu'] or 0:5.1f} "
            f"mem={r.get('memory', {}).get('max_reserved_gib', 0) or 0:5.1f} "
            f"first={r['first_step_s'] or 0:5.1f}s wall={r['wall_s']:5.1f}s",
            flush=True,
        )
        summary = summarize(results)
        Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "results": results}, indent=1))
        Path(f"{stem}.md").write_text(to_markdown(meta, results, summary))
    print(Path(f"{stem}.md").read_text() if results else "no results")
    return 0 if results and all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
