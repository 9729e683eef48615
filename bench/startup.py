"""Launch-to-first-step harness: a fresh pod (empty compile cache, stock) against a restarted pod whose
compile cache lives on the output volume (``torchtitan_runai.launcher.workers.worker_env``).

Usage (GPU machine, repository root, torchtitan importable):

    python -m bench.startup --out bench/results

Every run is a fresh ``torchrun ... -m torchtitan.train`` of stock torchtitan on the 8-layer proxy
(compile on, local batch 1, selective op AC, 3 steps, no checkpoint), timed from ``Popen`` to the
first ``step:`` line, with the moments of "Training starts" (model built, checkpoint looked for) and
of the first log line. Runs, in this order, all with ``TORCHINDUCTOR_CACHE_DIR`` = one fresh folder:

1. ``cold``: the folder is empty: what every stock start is (its default cache is under /tmp,
   which a new pod does not have), and what our first start is;
2. ``warm``, ``warm-2``: the same folder again: our restart after a preemption.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import shutil
from pathlib import Path

from bench.assets import build_all
from bench.child import child_env, run_torchrun
from bench.throughput import C, train_args, versions
from torchtitan_runai.launcher.workers import worker_env as startup_env

MARKS = {"first_line": None, "training_starts": "Training starts at step", "first_step": "step:"}


def run(name: str, cache: Path, corpus: Path, tok: Path, dump: Path, timeout: float) -> dict:
    env = child_env()
    env.update(startup_env(cache.parent.parent))  # <out>/.cache/inductor, as the launcher would
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    cfg = C(name, "stock", 1, "op")
    got: dict[str, float | None] = {k: None for k in MARKS}

    def on_line(line: str, now: float) -> None:
        for k, pat in MARKS.items():
            if got[k] is None and (
                pat is None or (pat in line and (k != "first_step" or re.search(r"step:\s*\d+\s+loss", line)))
            ):
                got[k] = now

    child = run_torchrun(
        ["-m", "torchtitan.train", *train_args(cfg, "gpu", corpus, tok, dump, 3)], env, timeout, on_line
    )
    lines = child.lines
    res = {
        "name": name,
        "rc": child.returncode,
        **{f"{k}_s": v for k, v in got.items()},
        "wall_s": child.wall_s,
        "env": {
            k: env[k]
            for k in (
                "TORCHINDUCTOR_CACHE_DIR",
                "TORCHINDUCTOR_FX_GRAPH_CACHE",
                "TORCHINDUCTOR_AUTOGRAD_CACHE",
                "PYTORCH_ALLOC_CONF",
            )
        },
    }
    if got["first_step"] is None:
        res["log_tail"] = lines[-30:]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--work", default="/tmp/bench-work")
    p.add_argument("--cache", default="/tmp/bench-startup/.cache/inductor")
    p.add_argument("--runs", default="cold,warm,warm-2")
    p.add_argument("--per-run-timeout-s", type=float, default=180)
    p.add_argument("--tag", default="startup")
    a = p.parse_args(argv)
    corpus, tok = build_all(Path(a.work) / "assets")
    cache = Path(a.cache)
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    meta = {"date": dt.date.today().isoformat(), "versions": versions()}
    meta["machine"] = meta["versions"].get("gpu") or platform.machine()
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", meta["machine"]).strip("-")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{a.tag}-{meta['date']}-{slug}"
    results = []
    for name in a.runs.split(","):
        dump = Path(a.work) / f"startup-{name}"
        shutil.rmtree(dump, ignore_errors=True)
        r = run(name, cache, corpus, tok, dump, a.per_run_timeout_s)
        results.append(r)
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(
            f"{name:8s} rc={r['rc']} first_line={f(r['first_line_s'])} training_starts={f(r['training_starts_s'])} "
            f"first_step={f(r['first_step_s'])}",
            flush=True,
        )
        L = [
            f"# Launch to first step: {meta['date']} on {meta['machine']}",
            "",
            "Stock torchtitan 0.2.2 `torchrun -m torchtitan.train`, 8-layer Llama 3.1 8B proxy, compile on, "
            "local batch 1, selective op AC, seq 8192, one GPU. `cold` = empty inductor cache (every stock pod "
            "start); `warm` = "
            "the same cache folder again (our restart: cache on the output volume). Seconds from launch.",
            "",
            "Software: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v),
            "",
            "| run | rc | first log line | training starts | first step |",
            "| --- | --- | --- | --- | --- |",
        ]
        L += [
            f"| {x['name']} | {x['rc']} | {f(x['first_line_s'])} | "
            f"{f(x['training_starts_s'])} | {f(x['first_step_s'])} |"
            for x in results
        ]
        Path(f"{stem}.md").write_text("\n".join(L) + "\n")
        Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(Path(f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
