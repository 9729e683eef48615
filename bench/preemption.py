"""Preemption on the pod's path, on a GPU: the shipped 8B recipe through run_llama_train.sh.

Runs ``train_configs/llama3_8b.toml`` through ``run_llama_train.sh`` (NGPU=1) with the 8B shape
truncated to 4 layers (``bench.proxy``'s ``8B_proxy4``: 1.9 B parameters, a 23 GB full checkpoint
per rank), local batch 2, seq 8192, ``async_with_pinned_mem``, a checkpoint every ``--interval``
steps (100 = one save per ~30 s at 0.3 s per step), checkpoints on ``--ckpt-root`` (a tmpfs: the
GPU host's disk is 64 GiB; ``keep_latest_k = 2``). Cases, each in a fresh folder:

- ``d``: uninterrupted, ``--steps`` steps: reference losses and every checkpoint's stall;
- ``a``: SIGTERM to the launcher ``--delay`` s after the first save's staging finished (its upload
  in flight), then restarted;
- ``b``: SIGTERM mid-interval (at step 1.3 x interval), then restarted;
- ``c``: kill -9 of the launcher's whole process group ``--delay`` s after the second save's
  staging (upload in flight), then restarted;
- ``stock-a``: stock torchtitan 0.2.2 (``torchrun -m torchtitan.train``, its llama3 spec, same
  shape and settings) in scenario ``a``, then restarted.

Restarts run to ``--resume-steps`` with the same LR schedule (``lr_scheduler.total_steps`` fixed)
and their exact losses (``TORCHTITAN_RUNAI_STEP_TRACE``) are compared with ``d``'s. Recorded per
case: signal -> launcher exit, the preemption line (signal -> marked checkpoint, upload wait, save),
whether the upload was in flight when the signal was sent (no ``.metadata`` yet), the resumed
step, the stall of every checkpoint (gap between the step lines around the save minus the median
gap), exit codes. Results: ``<out>/preemption-<date>-<machine>.json`` and ``.md`` after every case.

    mkdir -p /mnt/ck && mount -t tmpfs -o size=75g tmpfs /mnt/ck
    python3 -m bench.preemption --out bench/results --ckpt-root /mnt/ck --cases a,d,b
    python3 -m bench.preemption --out bench/results --ckpt-root /mnt/ck --cases c,stock-a   # appends

CPU smoke (toy flavor, seq 128, 2 steps per "interval"): ``python -m bench.preemption --cpu --out
/tmp/pre --ckpt-root /tmp/pre-ck --cases a,d``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.assets import build_all
from bench.child import child_env, run_command

RECIPE = "./train_configs/llama3_8b.toml"
TS_RE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
STEP_RE = re.compile(r"step:\s*(\d+)\s+loss:\s*([-\d.naife]+)")
# torchtitan's own line (stock, LOG_LEVEL=debug) or ours as training/log_filter rewrites it for a person's log
STAGED_RE = re.compile(
    r"Finished saving the checkpoint.*?in ([\d.]+) seconds|checkpoint(?: at step \d+)? saved in ([\d.]+) s"
)
PREEMPT_RE = re.compile(r"preemption: .*")
RESUMED_RE = re.compile(r"resuming from step (\d+)|Training starts at step (\d+)")  # ours | stock's
READY_RE = re.compile(r"checkpoint upload process ready in ([\d.]+)s")
EXITING_RE = re.compile(r"exiting \d+ ([\d.]+)s after the signal")


@dataclass
class Watch:
    """What one run's log shows, and the action to take at a point of it."""

    save_steps: list[int] = field(default_factory=list)
    step_times: dict[int, float] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    signal_sent: float | None = None
    in_flight: bool | None = None
    first_step_s: float | None = None


def kill_everything(pid: int) -> None:
    """SIGKILL a process and all its descendants (the ranks run in sessions of their own, so a
    process-group kill of the launcher would miss them): what a node loss or the OOM killer does."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def stamp(line: str) -> float | None:
    m = TS_RE.search(line)
    if not m:
        return None
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def normal_gaps(step_times: dict[int, float], save_steps: list[int]) -> list[float]:
    """Step-to-step gaps away from saves and the first steps of a launch."""
    steps = sorted(step_times)
    gaps = {s: step_times[s + 1] - step_times[s] for s in steps if s + 1 in step_times}
    return [g for s, g in gaps.items() if s not in save_steps and s - 1 not in save_steps and s > steps[0] + 3]


def stalls(step_times: dict[int, float], save_steps: list[int]) -> dict[int, float]:
    """Training time lost to the save after step N: gap N -> N+1 minus the median gap."""
    steps = sorted(step_times)
    gaps = {s: step_times[s + 1] - step_times[s] for s in steps if s + 1 in step_times}
    normal = normal_gaps(step_times, save_steps)
    if not normal:
        return {}
    median = statistics.median(normal)
    return {s: round(gaps[s] - median, 3) for s in save_steps if s in gaps}


class Bench:
    def __init__(self, a):
        self.a = a
        self.root = Path(a.ckpt_root)
        self.work = Path(a.work)
        self.corpus, self.tok = build_all(self.work / "assets")
        self.report = {"date": dt.date.today().isoformat(), "cases": {}}
        self.cache = self.root.parent / "inductor-cache" if not a.cpu else self.work / "inductor"

    # -- command lines ---------------------------------------------------------------------
    def shape(self) -> list[str]:
        a = self.a
        return [
            "--experimental.custom_import",
            "bench.proxy",
            "--model.flavor",
            "toy" if a.cpu else "8B_proxy4",
            "--model.hf_assets_path",
            str(self.tok),
            "--training.dataset",
            "c4_test",
            "--training.dataset_path",
            str(self.corpus),
            "--training.seq_len",
            str(getattr(a, "seq_len", None) or (128 if a.cpu else 8192)),
            "--training.local_batch_size",
            str(getattr(a, "local_batch", None) or 2),
            "--lr_scheduler.warmup_steps",
            "10",
            "--lr_scheduler.total_steps",
            str(a.steps),
            "--checkpoint.interval",
            str(a.interval),
            "--checkpoint.keep_latest_k",
            "2",
            "--checkpoint.async_mode",
            "async_with_pinned_mem",
            "--metrics.log_freq",
            "1",
            "--debug.seed",
            "7",
            # bit-exact comparisons need deterministic kernels (embedding backward uses atomics)
            *(["--debug.deterministic", "--debug.deterministic_warn_only"] if a.deterministic else []),
        ]

    def ours(self, dump: Path, steps: int) -> list[str]:
        cpu = ["--compile.no-enable"] if self.a.cpu else []
        return [
            "bash",
            "run_llama_train.sh",
            *self.shape(),
            *cpu,
            "--job.dump_folder",
            str(dump),
            "--training.steps",
            str(steps),
            "--metrics.no-enable-tensorboard",
        ]

    def stock(self, dump: Path, steps: int) -> list[str]:
        """Stock torchtitan with the recipe's settings spelled out (its config parser does not know
        our sections, so the recipe file cannot be passed)."""
        cpu = (
            ["--compile.no-enable"] if self.a.cpu else ["--compile.enable"]
        )  # torchtitan's default components: model, loss
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "1",
            "-m",
            "torchtitan.train",
            *self.shape(),
            *cpu,
            "--model.name",
            "llama3",
            "--optimizer.name",
            "AdamW",
            "--optimizer.lr",
            "3e-4",
            "--optimizer.eps",
            "1e-8",
            "--optimizer.implementation",
            "fused",
            "--training.max_norm",
            "1.0",
            "--training.mixed_precision_param",
            "bfloat16",
            "--activation_checkpoint.mode",
            "none",
            "--checkpoint.enable",
            "--checkpoint.folder",
            "checkpoint",
            "--job.dump_folder",
            str(dump),
            "--training.steps",
            str(steps),
            "--metrics.disable_color_printing",
        ]

    def env(self, trace: Path | None) -> dict[str, str]:
        extra = {"NGPU": "1", "CONFIG_FILE": RECIPE, "TORCHINDUCTOR_CACHE_DIR": str(self.cache), "LOG_RANK": "0"}
        # torchtitan's "Finished saving ... (or staging ...)" line, the moment an async save's staging
        # ends (the upload-in-flight signals key on it), is a debug line in ours' log since the
        # checkpoint's own line moved to its completion marker
        extra["LOG_LEVEL"] = "debug"
        if trace is not None:
            extra["TORCHTITAN_RUNAI_STEP_TRACE"] = str(trace)
        return child_env(**extra)

    # -- one launch --------------------------------------------------------------------------
    def launch(self, cmd: list[str], trace: Path | None, action=None, timeout: float | None = None) -> dict:
        w = Watch()
        box: dict = {}

        def on_start(proc):
            box["proc"] = proc

        def on_line(line: str, t: float):
            w.lines.append(line)
            m = STEP_RE.search(line)
            if m:
                step = int(m.group(1))
                ts = stamp(line)
                if ts is not None:
                    w.step_times[step] = ts
                w.losses[step] = float(m.group(2))
                if w.first_step_s is None:
                    w.first_step_s = round(t, 1)
            if STAGED_RE.search(line) and w.step_times and w.save_steps[-1:] != [max(w.step_times)]:
                w.save_steps.append(max(w.step_times))  # once per save: a sync save prints both lines
            if action is not None and w.signal_sent is None:
                action(w, line, box["proc"])

        run = run_command(cmd, self.env(trace), timeout or self.a.run_timeout, on_line=on_line, on_start=on_start)
        ended = time.monotonic()
        text = "\n".join(w.lines)
        found = RESUMED_RE.findall(text)
        ours = [int(x) for x, _ in found if x]
        theirs = [int(y) - 1 for _, y in found if y]  # "Training starts at step N+1"
        resumed = ours or theirs  # 0: started from scratch
        pre = PREEMPT_RE.findall(text)
        ready = READY_RE.findall(text)
        return {
            "exit": run.returncode,
            "status": run.status,
            "wall_s": round(run.wall_s, 1),
            "launch_to_first_step_s": w.first_step_s,
            "signal_to_exit_s": None if w.signal_sent is None else round(ended - w.signal_sent, 2),
            "upload_in_flight_at_signal": w.in_flight,
            "preemption_line": pre[-1] if pre else None,
            "upload_process_ready_s": float(ready[-1]) if ready else None,
            "signal_to_trainer_exit_call_s": float(EXITING_RE.findall(text)[-1]) if EXITING_RE.findall(text) else None,
            "resumed_from": resumed[-1] if resumed else None,
            "saves_after_step": w.save_steps,
            "stall_s": stalls(w.step_times, w.save_steps),
            "step_gaps": [round(g, 4) for g in normal_gaps(w.step_times, w.save_steps)],
            "last_step": max(w.step_times) if w.step_times else None,
            "losses": w.losses,
            "tail": w.lines[-25:] if run.returncode not in (0, 143) else [],
            "errors": [ln for ln in w.lines if ("Traceback" in ln or "Error:" in ln) and "lspci" not in ln][:10],
        }

    # -- actions -----------------------------------------------------------------------------
    def after_save(self, nth: int, sig: int, dump: Path):
        """Signal ``--delay`` s after the nth save's staging finished (upload in flight)."""

        def act(w: Watch, line: str, proc):
            if STAGED_RE.search(line) and len(w.save_steps) == nth:
                step = w.save_steps[-1]

                def fire():
                    time.sleep(self.a.delay)
                    w.in_flight = not (dump / "checkpoint" / f"step-{step}" / ".metadata").exists()
                    w.signal_sent = time.monotonic()
                    if sig == signal.SIGKILL:
                        kill_everything(proc.pid)
                    else:
                        proc.send_signal(sig)

                threading.Thread(target=fire, daemon=True).start()
                w.signal_sent = -1.0  # armed

        return act

    def at_step(self, step: int):
        def act(w: Watch, line: str, proc):
            m = STEP_RE.search(line)
            if m and int(m.group(1)) >= step:
                w.signal_sent = time.monotonic()
                w.in_flight = False
                proc.send_signal(signal.SIGTERM)

        return act

    def stop_when_resumed(self):
        def act(w: Watch, line: str, proc):
            if RESUMED_RE.search(line):
                w.signal_sent = time.monotonic()
                kill_everything(proc.pid)

        return act

    # -- cases ---------------------------------------------------------------------------------
    def fresh(self, name: str) -> tuple[Path, Path]:
        dump = self.root / name
        shutil.rmtree(dump, ignore_errors=True)
        trace = self.work / f"{name}-trace.jsonl"
        trace.unlink(missing_ok=True)
        return dump, trace

    def case(self, name: str) -> dict:
        a = self.a
        stock = name.startswith("stock")
        dump, trace = self.fresh(name)
        build = self.stock if stock else self.ours
        if name == "d":
            first = self.launch(build(dump, a.steps), trace)
            result = {"run": first}
        else:
            action = {
                "a": self.after_save(1, signal.SIGTERM, dump),
                "stock-a": self.after_save(1, signal.SIGTERM, dump),
                "b": self.at_step(int(1.3 * a.interval)),
                "c": self.after_save(2, signal.SIGKILL, dump),
            }[name]
            first = self.launch(build(dump, a.steps), trace, action)
            # stock restarts from step 1 (nothing to compare): stop it once it says where it starts
            again = self.launch(
                build(dump, a.resume_steps),
                trace,
                self.stop_when_resumed() if stock else None,
                timeout=a.resume_timeout,
            )
            result = {"run": first, "restart": again}
        result["trace_losses"] = read_trace(trace) if trace.exists() else {}
        shutil.rmtree(dump, ignore_errors=True)
        return result

    def compare(self) -> None:
        """Every interrupted case's steps after its resume against d's (exact, float.hex; stock:
        the logged 5-digit losses)."""
        ref = self.report["cases"].get("d")
        if ref is None:
            return
        for name, c in self.report["cases"].items():
            if name == "d" or "restart" not in c or name.startswith("stock"):
                continue
            after_step = c["restart"].get("resumed_from") or 0
            exact = bool(c["trace_losses"])
            mine = c["trace_losses"] if exact else {int(k): v for k, v in c["restart"]["losses"].items()}
            theirs = ref["trace_losses"] if exact else {int(k): v for k, v in ref["run"]["losses"].items()}
            mine = {int(k): v for k, v in mine.items()}
            theirs = {int(k): v for k, v in theirs.items()}
            steps = [s for s in sorted(set(mine) & set(theirs)) if s > after_step]
            as_float = (lambda v: float.fromhex(v)) if exact else float
            c["compared_steps"] = [steps[0], steps[-1]] if steps else None
            c["losses_equal_d"] = bool(steps) and all(mine[s] == theirs[s] for s in steps)
            c["max_abs_loss_diff_vs_d"] = max(
                (abs(as_float(mine[s]) - as_float(theirs[s])) for s in steps), default=None
            )

    def write(self) -> None:
        self.compare()
        out = Path(self.a.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"preemption-{self.report['date']}-{self.report.get('machine', 'cpu')}{self.a.tag}"
        (out / f"{stem}.json").write_text(json.dumps(self.report, indent=1, default=str))
        (out / f"{stem}.md").write_text(render(self.report))


def read_trace(path: Path) -> dict[int, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


def render(report: dict) -> str:
    settings = {
        k: v for k, v in report.get("settings", {}).items() if k in ("steps", "resume_steps", "interval", "delay")
    }
    lines = [
        f"# Preemption on the pod's path: {report.get('machine')} ({report['date']})",
        "",
        f"torch {report.get('torch')}; {report.get('note', '')}; settings: {settings}",
        "",
        "| case | exit | signal -> exit s | upload in flight at signal | preemption line | stalls s (after step: s) | "
        "restart: resumed from, exit | losses after resume = d (steps, max diff) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in report["cases"].items():
        r, again = c["run"], c.get("restart", {})
        lines.append(
            f"| {name} | {r['exit']} | {r['signal_to_exit_s']} | {r['upload_in_flight_at_signal']} | "
            f"{r['preemption_line'] or ''} | {r['stall_s']} | {again.get('resumed_from')}, {again.get('exit')} | "
            f"{c.get('losses_equal_d')} ({c.get('compared_steps')}, {c.get('max_abs_loss_diff_vs_d')}) |"
        )
    lines += [
        "",
        "Launch to first step (s): "
        + ", ".join(
            f"{n}: {c['run'].get('launch_to_first_step_s')}"
            + (f" / restart {c['restart'].get('launch_to_first_step_s')}" if "restart" in c else "")
            for n, c in report["cases"].items()
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--ckpt-root", default="/mnt/ck")
    p.add_argument("--work", default="/tmp/bench-preemption")
    p.add_argument("--cases", default="a,d,b,c,stock-a")
    p.add_argument("--steps", type=int, default=210)
    p.add_argument("--resume-steps", type=int, default=140)
    p.add_argument("--interval", type=int, default=100)
    p.add_argument("--delay", type=float, default=0.5)
    p.add_argument("--run-timeout", type=float, default=250)
    p.add_argument("--resume-timeout", type=float, default=200)
    p.add_argument("--cpu", action="store_true")
    p.add_argument(
        "--no-deterministic",
        dest="deterministic",
        action="store_false",
        help="leave torchtitan's non-deterministic kernels on (losses then differ run to run)",
    )
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    b = Bench(a)
    import torch

    b.report.update(
        machine=torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        settings=vars(a),
        note="8B shape, 4 layers, local batch 2, seq 8192, async_with_pinned_mem, tmpfs" if not a.cpu else "toy",
    )
    existing = Path(a.out) / f"preemption-{b.report['date']}-{b.report['machine']}{a.tag}.json"
    if existing.exists():  # a second call appends its cases
        b.report["cases"] = json.loads(existing.read_text()).get("cases", {})
    for name in a.cases.split(","):
        began = time.monotonic()
        b.report["cases"][name] = b.case(name)
        b.report["cases"][name]["case_wall_s"] = round(time.monotonic() - began, 1)
        b.write()
        c = b.report["cases"][name]
        brief = {k: v for k, v in c["run"].items() if k not in ("losses", "tail")}
        print(
            json.dumps(
                {
                    name: brief,
                    "restart": {k: v for k, v in c.get("restart", {}).items() if k != "losses"},
                    "equal": c.get("losses_equal_d"),
                    "diff": c.get("max_abs_loss_diff_vs_d"),
                },
                default=str,
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
