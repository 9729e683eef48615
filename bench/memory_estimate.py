"""Compare the preflight memory estimate with measured peaks of the 8-layer Llama 3.1 8B proxy.

    python -m bench.memory_estimate [--out bench/results/memory-estimate-DATE.md]

The measured set (all one H100 80GB, seq_len 8192, AdamW, bf16, one GPU, stock torchtitan 0.2.2 loss):

* ``ANCHORS``: the peak-memory column of shared/reference/performance-anchors.md (2026-11-25;
  torchtitan's logged ``max_reserved``);
* every ``bench/results/*.json`` of ``bench.throughput``: rows of the stock group and loss
  (``memory.max_reserved_gib``);
* ``bench/results/memory-peaks-*.json`` (the performance engineer's summary: ``configs`` with
  ``seq_len``, ``local_batch_size``, ``ac_mode``, ``compile``, ``float8``, ``loss``, ``max_reserved_gib``),
  plain-loss rows not already read from their source file.

* ``bench/results/memory-estimate-*-measured.json``: this script's own GPU runs (``--measure``), shapes
  the estimator was not calibrated on (selective every-2nd-layer AC, seq_len 4096, eager without AC).

The estimate compared is ``allocator_peak_gib`` (no CUDA context, like max_reserved). Pure CPU,
except ``--measure OUT_JSON`` (a GPU machine with torchtitan and torchao importable), which runs
``MEASURE`` through ``bench.throughput``'s harness (a fresh torchrun per configuration, whole-run peak
memory recorded by ``bench.proxy``) and writes the rows to OUT_JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

from torchtitan_runai.launcher.memory_estimate import ModelShape, TrainSettings, estimate_memory

ROOT = Path(__file__).resolve().parent.parent
PROXY = ModelShape(dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256)
ANCHOR_SOURCE = "shared/reference/performance-anchors.md (H100, 2026-11-25)"

# (label, lbs, ac, compile, float8, measured max_reserved GiB)
ANCHORS = [
    ("eager, selective op (earlier machine)", 1, "op", False, False, 55.5),
    ("compile, selective op", 1, "op", True, False, 43.95),
    ("compile, AC none", 1, "none", True, False, 50.5),
    ("compile, lbs 2, selective op", 2, "op", True, False, 50.6),
    ("compile, float8, selective op", 1, "op", True, True, 43.7),
    ("compile, float8, AC none", 1, "none", True, True, 43.8),
    ("compile, lbs 2, AC none", 2, "none", True, False, 67.5),
    ("compile, lbs 4, selective op", 4, "op", True, False, 67.4),
    ("compile, lbs 4, full AC", 4, "full", True, False, 57.4),
    ("compile, float8, lbs 2, selective op", 2, "op", True, True, 49.6),
    ("compile, float8, lbs 2, AC none", 2, "none", True, True, 58.1),
    ("compile, float8, lbs 4, selective op", 4, "op", True, True, 68.7),
]


def settings(lbs: int, ac: str, compile_: bool, float8: bool, seq_len: int = 8192) -> TrainSettings:
    if ac in ("none", "full"):
        mode, option = ac, "op"
    elif ac == "op":
        mode, option = "selective", "op"
    elif ac.startswith("layer"):
        mode, option = "selective", ac[len("layer") :]
    else:
        raise ValueError(f"unknown AC label {ac!r}")
    return TrainSettings(
        seq_len=seq_len, local_batch_size=lbs, ac_mode=mode, ac_option=option, compile=compile_, float8=float8
    )


def _ac_label(mode: str) -> str:
    """memory-peaks' "selective(op)" / "selective(every 4-th layer)" / "none" / "full" -> our labels."""
    if mode.startswith("selective"):
        inner = mode[mode.find("(") + 1 : mode.rfind(")")]
        digits = "".join(ch for ch in inner if ch.isdigit())
        return "op" if inner == "op" else f"layer{digits}"
    return mode


def _json_rows(path: str, source: str):
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "configs" in data:  # memory-peaks-*.json
        for r in data["configs"]:
            if r.get("loss", "plain") != "plain" or not r.get("max_reserved_gib"):
                continue
            yield (
                r["config"],
                int(r["local_batch_size"]),
                _ac_label(r["ac_mode"]),
                bool(r["compile"]),
                bool(r["float8"]),
                float(r["max_reserved_gib"]),
                r.get("source") or source,
                int(r.get("seq_len", 8192)),
            )
        return
    rows = data.get("results", data.get("rows", [])) if isinstance(data, dict) else data
    for r in rows:
        if not isinstance(r, dict) or "lbs" not in r or "ac" not in r:
            continue
        if r.get("status", "ok") != "ok" or r.get("group", "stock") != "stock" or r.get("loss", "plain") != "plain":
            continue
        measured = r.get("max_reserved_gib") or (r.get("memory") or {}).get("max_reserved_gib")
        if not measured:
            continue
        extra = list(r.get("extra") or [])
        seq = int(extra[extra.index("--training.seq_len") + 1]) if "--training.seq_len" in extra else 8192
        yield (
            r.get("name", "?"),
            int(r["lbs"]),
            str(r["ac"]),
            bool(r.get("compile", True)),
            bool(r.get("float8", False)),
            float(measured),
            source,
            seq,
        )


def comparison_rows():
    """Anchors, then every JSON under bench/results with stock-loss rows; a run listed twice (a
    results file and memory-peaks' copy of it) counts once."""
    for row in ANCHORS:
        yield (*row, ANCHOR_SOURCE, 8192)
    results = ROOT / "bench" / "results"
    seen = set()
    for path in sorted(glob.glob(str(results / "*.json"))):
        for row in _json_rows(path, os.path.relpath(path, ROOT)):
            key = (row[0], os.path.basename(row[6]))
            if key not in seen:
                seen.add(key)
                yield row


def compare():
    out = []
    for label, lbs, ac, comp, f8, measured, source, seq in comparison_rows():
        est = estimate_memory(PROXY, settings(lbs, ac, comp, f8, seq))
        predicted = est.allocator_peak_gib
        out.append(
            dict(
                label=label,
                seq=seq,
                lbs=lbs,
                ac=ac,
                compile=comp,
                float8=f8,
                measured=measured,
                estimate=predicted,
                error=100 * (predicted - measured) / measured,
                moment=est.moment,
                biggest=est.biggest,
                source=source,
            )
        )
    return out


def markdown(rows) -> str:
    lines = [
        "| configuration | seq | lbs | AC | compile | float8 | measured GiB | estimate GiB | error | peak at "
        "| source |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['seq']} | {r['lbs']} | {r['ac']} | {r['compile']} | {r['float8']} | "
            f"{r['measured']:.2f} | "
            f"{r['estimate']:.2f} | {r['error']:+.1f}% | {r['moment']} | {r['source']} |"
        )
    errors = [abs(r["error"]) for r in rows]
    within = sum(e <= 10 for e in errors)
    lines.append("")
    lines.append(
        f"{len(rows)} measurements: {within} within ±10%; mean |error| {sum(errors) / len(errors):.1f}%, "
        f"max |error| {max(errors):.1f}%."
    )
    return "\n".join(lines)


def measure(out_json: str, steps: int = 6, timeout: float = 110) -> None:
    import datetime as dt

    from bench import throughput as tp
    from bench.assets import build_all

    work = Path("/tmp/bench-memory")
    corpus, tok = build_all(work / "assets")
    meta = {"date": dt.date.today().isoformat(), "versions": tp.versions(), "steps": steps}
    results = []
    for cfg in MEASURE:
        r = tp.run_one(cfg, "gpu", corpus, tok, work, steps, timeout)
        r.pop("intervals", None)
        results.append(r)
        print(cfg.name, r["status"], (r.get("memory") or {}).get("max_reserved_gib"), flush=True)
        Path(out_json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def _measure_configs():
    from bench.throughput import C

    return [
        C("stock-bf16-lbs2-layer2", "stock", 2, "layer2"),
        C("stock-bf16-seq4096-lbs4-noac", "stock", 4, "none", extra=["--training.seq_len", "4096"]),
        C("stock-bf16-eager-lbs1-noac", "stock", 1, "none", compile=False),
    ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the markdown table here as well")
    parser.add_argument("--measure", metavar="OUT_JSON", help="run MEASURE on this GPU and write the rows")
    args = parser.parse_args(argv)
    if args.measure:
        global MEASURE
        MEASURE = _measure_configs()
        measure(args.measure)
        return 0
    table = markdown(compare())
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
