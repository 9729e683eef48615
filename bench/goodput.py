"""Goodput under a preemption schedule, stock torchtitan and ours in one call, on one GPU.

The same proxy and schedule for both sides (``bench.preemption``'s 8B shape truncated to 4 layers,
a 23 GB full checkpoint; ``--steps`` steps, a checkpoint every ``--interval``; checkpoints on a
tmpfs). Three SIGTERMs, each followed at once by a restart of the same command:

1. ``--delay`` s after the first save's staging finished (its upload in flight);
2. mid-interval (step 2.5 x interval);
3. just before a save (two steps before step 4 x interval);

then the fourth launch runs to ``--steps``. Ours: the shipped ``train_configs/llama3_8b.toml``
through ``run_llama_train.sh`` (async_with_pinned_mem, staging pool, early upload process, writer
threads). Stock: ``torchrun -m torchtitan.train`` 0.2.2 with ``--stock-mode`` (default ``async``:
its ``async_with_pinned_mem`` loses its third save on torch 2.11 with ``KeyError: <class 'type'>``,
bench/results/checkpoint-stall-*), torchtitan's own resume (newest folder with ``.metadata``).

Measured per side, from the bench's own clock and the log's timestamps: the wall time from the
first launch to the last exit; ETTR = steps x median step time / wall; launch -> first step of
every launch (the first cold, the restarts with the compile cache the first one wrote); the stall
of every interval save (step gap around it minus the median gap); signal -> exit; redone steps
(trained before a signal and again after the restart). For ours, the product's own ledger
(``<dump>/goodput.json``, written by the launcher at each exit) against the bench's wall clock.

The projection for a reference job (``--ref-hours`` 24, a checkpoint every ``--ref-ckpt-min`` 30,
a preemption every ``--ref-preempt-hours`` 4) uses the measured components: a warm launch ->
first step per restart, the median stall per save, signal -> exit per preemption, and the work a
preemption loses: none for ours (it saves the step it is at), half a checkpoint interval on
average for stock (it saves nothing at a signal), plus the first launch's cold start.

    mkdir -p /mnt/ck && mount -t tmpfs -o size=75g tmpfs /mnt/ck
    python3 -m bench.goodput --out bench/results --ckpt-root /mnt/ck

CPU toy mode (CI: tests/bench): ``python -m bench.goodput --cpu --out /tmp/gp --ckpt-root /tmp/gp-ck``
(toy flavor, 4 steps per interval, 24 steps).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from bench.preemption import Bench

SIDES = ("ours", "stock")


class GoodputBench(Bench):
    def stock(self, dump: Path, steps: int) -> list[str]:
        cmd = super().stock(dump, steps)
        i = cmd.index("async_with_pinned_mem")
        cmd[i] = self.a.stock_mode
        if self.a.stock_mode == "disabled":
            del cmd[i - 1 : i + 1]
        return cmd

    def schedule(self, launch_no: int, dump: Path):
        """The action of launch ``launch_no`` (1-based): the three signals, then none."""
        interval = self.a.interval
        if launch_no == 1:
            return self.after_save(1, signal.SIGTERM, dump)
        if launch_no == 2:
            return self.at_step(int(2.5 * interval))
        if launch_no == 3:
            return self.at_step(4 * interval - 2)
        return None

    def side(self, name: str) -> dict:
        a = self.a
        dump, _ = self.fresh(f"goodput-{name}")
        build = self.stock if name == "stock" else self.ours
        shutil.rmtree(self.cache, ignore_errors=True)  # each side starts from an empty compile cache
        launches = []
        began = time.monotonic()
        began_wall = time.time()
        for n in range(1, 5):
            run = self.launch(build(dump, a.steps), None, self.schedule(n, dump), timeout=a.run_timeout)
            run.pop("losses", None)
            run["on_disk"] = on_disk(dump)
            launches.append(run)
            self.report["sides"][name] = {"partial": True, "launches": launches}
            self.write()  # a call cut short still returns what ran
            print(
                json.dumps(
                    {
                        name: n,
                        **{
                            k: run[k]
                            for k in (
                                "exit",
                                "wall_s",
                                "launch_to_first_step_s",
                                "resumed_from",
                                "last_step",
                                "signal_to_exit_s",
                                "on_disk",
                            )
                        },
                    }
                ),
                flush=True,
            )
            if run["exit"] == 0 and n < 4:
                break
            if run["exit"] not in (0, 143, 1, -15) or run["status"] == "timeout":
                break
        wall = time.monotonic() - began
        ended_wall = time.time()
        result = {"wall_s": round(wall, 2), "launches": launches}
        result.update(components(launches, a.steps))
        if name == "ours":
            result["ledger"] = ledger_check(dump, wall, began_wall, ended_wall)
        shutil.rmtree(dump, ignore_errors=True)
        return result

    def write(self) -> None:
        out = Path(self.a.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"goodput-{self.report['date']}-{self.report.get('machine', 'cpu')}{self.a.tag}"
        (out / f"{stem}.json").write_text(json.dumps(self.report, indent=1, default=str))
        (out / f"{stem}.md").write_text(render(self.report))


def on_disk(dump: Path) -> dict:
    """The checkpoint folder after a launch, counted from outside the product: the step folders that
    hold DCP's ``.metadata`` (complete saves; ours also marks them), every step folder, and the bytes
    of all of it (what the volume must hold; checkpoint.keep_latest_k should bound it)."""
    folder = dump / "checkpoint"
    steps = sorted((p for p in folder.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
    return {
        "complete": [int(p.name.split("-")[1]) for p in steps if (p / ".metadata").is_file()],
        "step_folders": len(steps),
        "gib": round(size / 1024**3, 2),
    }


def components(launches: list[dict], steps: int) -> dict:
    """Median step, stalls, redone steps, ETTR numerator, from the launches' parsed logs."""
    gaps, stalls = [], []
    redone = 0
    for i, run in enumerate(launches):
        stalls += [s for s in run.get("stall_s", {}).values()]
        if i + 1 < len(launches):
            after = launches[i + 1].get("resumed_from") or 0
            redone += max(0, (run.get("last_step") or 0) - after)
        gaps += run.get("step_gaps", [])
    median = statistics.median(gaps) if gaps else None
    return {
        "median_step_s": median,
        "stall_per_save_s": statistics.median(stalls) if stalls else None,
        "stalls_s": stalls,
        "redone_steps": redone,
        "launch_to_first_step_s": [r.get("launch_to_first_step_s") for r in launches],
        "signal_to_exit_s": [r.get("signal_to_exit_s") for r in launches if r.get("signal_to_exit_s") is not None],
        "finished": bool(launches) and launches[-1]["exit"] == 0 and launches[-1].get("last_step") == steps,
    }


def ledger_check(dump: Path, wall: float, began: float, ended: float) -> dict:
    from torchtitan_runai.goodput.ledger import read_records
    from torchtitan_runai.goodput.report import summarize

    records = read_records(dump / "checkpoint" / "goodput")
    if not records:
        return {"found": False}
    s = summarize(records)
    return {
        "found": True,
        "span_s": round(s["span_s"], 2),
        "bench_wall_s": round(wall, 2),
        "diff_pct": round(100 * (s["span_s"] - wall) / wall, 3),
        "first_launch_after_bench_start_s": round(s["begin"] - began, 3),
        "last_exit_before_bench_end_s": round(ended - s["end"], 3),
        "goodput": s["goodput"],
        "productive_of_span": s["productive_of_span"],
        "seconds": {k: round(v, 2) for k, v in s["seconds"].items()},
        "segments": len(s["segments"]),
    }


def ettr(side: dict, steps: int) -> float | None:
    m = side.get("median_step_s")
    return None if m is None else steps * m / side["wall_s"]


def projection(side: dict, name: str, hours: float, ckpt_min: float, preempt_hours: float) -> dict:
    """ETTR of a reference job from the measured components (see the module docstring)."""
    total = hours * 3600
    saves = int(total // (ckpt_min * 60))
    preemptions = int(hours // preempt_hours)
    firsts = [t for t in side["launch_to_first_step_s"] if t is not None]
    cold = firsts[0] if firsts else 0.0
    warm = statistics.median(firsts[1:]) if len(firsts) > 1 else cold
    exit_s = statistics.median(side["signal_to_exit_s"]) if side["signal_to_exit_s"] else 0.0
    stall = side.get("stall_per_save_s") or 0.0
    lost_work = 0.0 if name == "ours" else ckpt_min * 60 / 2
    lost = cold + saves * stall + preemptions * (warm + exit_s + lost_work)
    return {
        "saves": saves,
        "preemptions": preemptions,
        "cold_start_s": cold,
        "warm_start_s": warm,
        "stall_per_save_s": stall,
        "exit_after_signal_s": exit_s,
        "work_lost_per_preemption_s": lost_work,
        "lost_s": round(lost, 1),
        "ettr": 1 - lost / total,
    }


def render(report: dict) -> str:
    s = report.get("settings", {})
    lines = [
        f"# Goodput under a preemption schedule: {report.get('machine')} ({report['date']})",
        "",
        f"torch {report.get('torch')}; {report.get('note', '')}; {s.get('steps')} steps, a checkpoint every "
        f"{s.get('interval')}, SIGTERM after the 1st save's staging (+{s.get('delay')} s), at step "
        f"{int(2.5 * s.get('interval', 0))} and at step {4 * s.get('interval', 0) - 2}, each restarted at once; "
        f"stock checkpoint mode: {s.get('stock_mode')}",
        "",
        "| | wall s | median step s | ETTR measured | launch -> first step s (cold, restarts) | stall per save s | "
        "signal -> exit s | redone steps | finished | projected ETTR (reference job) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in SIDES:
        side = report["sides"].get(name)
        if not side or side.get("partial"):
            continue
        proj = side.get("projection", {})
        lines.append(
            f"| {name} | {side['wall_s']} | {fmt(side.get('median_step_s'))} | {pct(side.get('ettr'))} | "
            f"{side['launch_to_first_step_s']} | {fmt(side.get('stall_per_save_s'))} | "
            f"{side['signal_to_exit_s']} | {side['redone_steps']} | {side['finished']} | {pct(proj.get('ettr'))} |"
        )
    r = report.get("ratio")
    lines += ["", f"ETTR ours / stock (measured): {fmt(r)}"]
    led = report["sides"].get("ours", {}).get("ledger")
    if led and led.get("found"):
        lines += [
            "",
            f"Ours' ledger: span {led['span_s']} s against the bench's {led['bench_wall_s']} s "
            f"({led['diff_pct']:+.2f}%); goodput {pct(led['goodput'])}; seconds {led['seconds']}",
        ]
    lines += [
        "",
        "Reference job: "
        + json.dumps({n: report["sides"][n].get("projection") for n in SIDES if n in report["sides"]}),
    ]
    return "\n".join(lines) + "\n"


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--ckpt-root", default="/mnt/ck")
    p.add_argument("--work", default="/tmp/bench-goodput")
    p.add_argument("--sides", default="ours,stock")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--interval", type=int, default=100)
    p.add_argument("--delay", type=float, default=1.0)
    p.add_argument("--stock-mode", default="async", choices=("async", "disabled", "async_with_pinned_mem"))
    p.add_argument("--run-timeout", type=float, default=400)
    p.add_argument("--ref-hours", type=float, default=24)
    p.add_argument("--ref-ckpt-min", type=float, default=30)
    p.add_argument("--ref-preempt-hours", type=float, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="override the proxy's 8192 (GPU) / 128 (CPU)")
    p.add_argument("--local-batch", type=int, default=None, help="override the proxy's local batch of 2")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    a.deterministic = False
    if a.cpu and a.steps == 600:
        a.steps, a.interval = 24, 4
    b = GoodputBench(a)
    import torch

    b.report.update(
        machine=torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        settings=vars(a),
        sides={},
        note=(f"8B shape, 4 layers, local batch {a.local_batch or 2}, seq {a.seq_len or 8192}, checkpoints on tmpfs")
        if not a.cpu
        else "toy",
    )
    existing = Path(a.out) / f"goodput-{b.report['date']}-{b.report['machine']}{a.tag}.json"
    if existing.exists():  # a second call (--sides stock after --sides ours) adds its side
        b.report["sides"] = {
            k: v for k, v in json.loads(existing.read_text()).get("sides", {}).items() if not v.get("partial")
        }
    for name in a.sides.split(","):
        side = b.side(name)
        side["ettr"] = ettr(side, a.steps)
        side["projection"] = projection(side, name, a.ref_hours, a.ref_ckpt_min, a.ref_preempt_hours)
        b.report["sides"][name] = side
        ours, stock = (b.report["sides"].get(n, {}).get("ettr") for n in SIDES)
        b.report["ratio"] = ours / stock if ours and stock else None
        b.write()
    print(render(b.report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
