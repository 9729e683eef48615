"""Checkpoint stall harness: stock async_with_pinned_mem against ours (reusable stager), then a resume check.

Usage (GPU machine, repository root, torchtitan importable; the checkpoint root should be RAM-backed
or hold one ~33 GB proxy checkpoint):

    python -m bench.checkpoint_stall --out bench/results --ckpt-root /mnt/ck

Runs, one fresh ``torchrun`` each, on the 8-layer Llama 3.1 8B proxy (``bench.proxy``), compile on,
local batch 1, seq 8192, checkpoints at ``--interval`` and ``2 * --interval``:

1. ``stock-pinned``: torchtitan's Trainer, ``checkpoint.async_mode = "async_with_pinned_mem"``;
2. ``ours``: the same Trainer plus the wiring line of ``torchtitan_runai.training.checkpoint.staging.install``
   (exactly what trainer.py gets): the reusable stager and the staging pool prepared from the start;
   ``ours-reuse-only`` (opt-in run) has the reusable stager alone (``prepare_at_start = false``), so
   the results show each lever's own gain. Each run compiles from its own empty Inductor cache, so
   the launch-to-first-step column compares like for like;
3. ``ours-resume``: a new process resumes from run 2's last checkpoint (``load_only``) and trains
   two steps; their losses must equal run 2's at the same steps: the checkpoint is loadable and
   restores model, optimizer, data position and schedule.

Both training runs use the child entry (``BENCH_STALL_CHILD=1``): torchtitan's ``main`` with a Trainer subclass
that only adds timing (CUDA-synchronised wall clock at every step boundary, i.e. after the step's
``checkpointer.save``) and, at the end, waits for the last upload so that it can be verified.
Figure of merit per checkpoint at step N: the sum over steps N..N+W-1 of (step time - median normal
step time) = training time lost to that save. A watcher deletes every checkpoint but the newest as
soon as a newer one appears (the machine's disk/RAM holds one proxy checkpoint at a time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import threading
import time
from pathlib import Path

from bench.child import child_env, run_torchrun

SAVE_RE = re.compile(r"Finished saving the checkpoint.*?in ([\d.]+) seconds")
PREP_RE = re.compile(r"checkpoint staging memory prepared in ([\d.]+)s")
STEP_RE = re.compile(r"step:\s*(\d+)\s+loss:\s*([-\d.naife]+)")


# ---------------------------------------------------------------- child (runs under torchrun)
def child() -> None:
    """torchtitan's ``main`` reads ``sys.argv`` (its parser's default is bound at import): the child
    is therefore selected by ``BENCH_STALL_CHILD=1``, and argv is torchtitan's alone."""
    import torch

    from torchtitan_runai import upstream
    from torchtitan_runai.config import CheckpointPerf
    from torchtitan_runai.training.checkpoint import staging as ckpt_perf

    class StallTrainer(upstream.Trainer):
        def __init__(self, job_config):
            super().__init__(job_config)
            self._bench_times: list[tuple[int, float, bool]] = []
            self._upload_errors: list[str] = []
            self._pool = None
            if os.environ.get("BENCH_CKPT_PERF") == "1":
                # --- the wiring trainer.py gets ---
                perf = CheckpointPerf(prepare_at_start=os.environ.get("BENCH_PREPARE", "1") == "1")
                self._pool = ckpt_perf.install(
                    self.checkpointer,
                    job_config.checkpoint,
                    perf,
                    model_parts=self.model_parts,
                    optimizer_name=job_config.optimizer.name,
                )

        def should_continue_training(self) -> bool:
            if torch.cuda.is_available():  # this stream only: the staging stream's copies are not a stall
                torch.cuda.current_stream().synchronize()
            fut = getattr(self.checkpointer, "save_future", None)
            done = bool(fut is not None and fut.done())
            if done and fut.exception() is not None and not self._upload_errors:
                self._upload_errors.append(f"step {self.step}: {fut.exception()!r}")  # a save was lost
            self._bench_times.append((self.step, time.perf_counter(), done))
            # stop before training.steps: torchtitan's last step would add a model-only synchronous save
            if self.step >= int(os.environ.get("BENCH_STOP_AT", "0") or 10**9):
                return False
            return super().should_continue_training()

        def close(self) -> None:
            out = os.environ.get("BENCH_TIMES_OUT")
            if out and int(os.environ.get("RANK", "0")) == 0:
                Path(out).write_text(
                    json.dumps(
                        {
                            "times": self._bench_times,
                            "prepared_s": getattr(self._pool, "seconds", None),
                            "pool": None
                            if self._pool is None
                            else {
                                "gb": round(self._pool.nbytes / 1e9, 2),
                                "storages": len(self._pool.sizes),
                                "taken": self._pool.taken,
                                "missed": self._pool.missed,
                                "error": repr(self._pool.error) if self._pool.error else None,
                            },
                            "upload_errors": self._upload_errors,
                        }
                    )
                )
            fut = getattr(self.checkpointer, "save_future", None)
            if fut is not None:
                t = time.perf_counter()
                try:
                    fut.result()  # the last checkpoint must be complete before it is verified
                except Exception as exc:
                    print(f"bench: last checkpoint upload FAILED: {exc!r}", flush=True)
                    raise
                print(f"bench: last upload finished {time.perf_counter() - t:.1f}s after training", flush=True)
            super().close()

    upstream.torchtitan_main(StallTrainer)


# ---------------------------------------------------------------- analysis (pure)
def step_durations(times: list) -> dict[int, float]:
    """{step k: wall time from the boundary after step k-1 to the boundary after step k}."""
    out = {}
    for (s0, t0, _), (s1, t1, _) in zip(times, times[1:]):
        if s1 == s0 + 1:
            out[s1] = t1 - t0
    return out


def stall_report(times: list, ckpt_steps: list[int], window: int = 5, skip_first: int = 2) -> dict:
    d = step_durations(times)
    busy = {k for n in ckpt_steps for k in range(n, n + window)}
    normal = [v for k, v in d.items() if k > skip_first and k not in busy]
    med = statistics.median(normal) if normal else float("nan")
    rep = {"median_step_s": med, "normal_steps": len(normal), "window": window, "checkpoints": []}
    for n in ckpt_steps:
        ks = [k for k in range(n, n + window) if k in d]
        rep["checkpoints"].append(
            {
                "step": n,
                "lost_s": sum(d[k] - med for k in ks),
                "step_times_s": {k: round(d[k], 4) for k in ks},
            }
        )
    # steps 2 .. first checkpoint - 1: where a background preparation still running would show
    first = min(ckpt_steps) if ckpt_steps else 0
    pre = [k for k in range(2, first) if k in d]
    rep["pre_checkpoint_lost_s"] = sum(d[k] - med for k in pre)
    rep["pre_checkpoint_steps"] = [pre[0], pre[-1]] if pre else []
    # boundary at which the previous upload was seen finished (progress of the saving process)
    rep["upload_done_seen_at_step"] = [s for (s, _, done), (_, _, prev) in zip(times[1:], times) if done and not prev]
    return rep


# ---------------------------------------------------------------- parent
def _watch_keep_newest(folder: Path, stop: threading.Event) -> None:
    while not stop.is_set():
        steps = sorted((int(m.group(1)), p) for p in folder.glob("step-*") if (m := re.search(r"step-(\d+)", p.name)))
        for _, p in steps[:-1]:
            shutil.rmtree(p, ignore_errors=True)
        stop.wait(0.5)


def train_args(
    dump: Path, corpus: Path, tok: Path, steps: int, interval: int, extra: list[str], cpu: bool = False
) -> list[str]:
    """``cpu``: toy flavor, no compile, plain async (pinned staging needs CUDA): a smoke of the harness."""
    args = [
        "--job.dump_folder",
        str(dump),
        "--experimental.custom_import",
        "bench.proxy",
        "--model.name",
        "llama3",
        "--model.flavor",
        "toy" if cpu else "8B_proxy8",
        "--model.hf_assets_path",
        str(tok),
        "--training.dataset",
        "c4_test",
        "--training.dataset_path",
        str(corpus),
        "--training.seq_len",
        "256" if cpu else "8192",
        "--training.local_batch_size",
        "1",
        "--training.steps",
        "1000",  # the schedule's length; the child stops at BENCH_STOP_AT=steps
        "--lr_scheduler.warmup_steps",
        "2",
        "--metrics.log_freq",
        "1",
        "--metrics.disable_color_printing",
        "--activation_checkpoint.mode",
        "selective",
        "--activation_checkpoint.selective_ac_option",
        "op",
        "--debug.seed",
        "42",
        "--checkpoint.enable",
        "--checkpoint.folder",
        "checkpoint",
        "--checkpoint.interval",
        str(interval),
        "--checkpoint.async_mode",
        "async" if cpu else "async_with_pinned_mem",
        "--checkpoint.keep_latest_k",
        "0",
    ]
    return args + ([] if cpu else ["--compile.enable"]) + extra


def run(name: str, args: list[str], env_extra: dict, dump: Path, timeout: float, steps: int) -> dict:
    dump.mkdir(parents=True, exist_ok=True)
    times_json = dump / "times.json"
    env = child_env(BENCH_TIMES_OUT=str(times_json), PYTORCH_ALLOC_CONF="expandable_segments:True")
    env.update(env_extra, BENCH_STALL_CHILD="1", BENCH_STOP_AT=str(steps))
    # each run compiles from an empty cache: launch-to-first-step is compared like for like
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", f"/tmp/bench-inductor-{name}-{os.getpid()}")
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_keep_newest, args=(dump / "checkpoint", stop), daemon=True)
    watcher.start()
    losses: dict[int, float] = {}
    saves: list[float] = []
    first: list[float] = []

    def on_line(line: str, now: float) -> None:
        if m := STEP_RE.search(line):
            first.append(now)
            losses[int(m.group(1))] = float(m.group(2))
        if m := SAVE_RE.search(line):
            saves.append(float(m.group(1)))

    try:
        child = run_torchrun(["-m", "bench.checkpoint_stall", *args], env, timeout, on_line)
    finally:
        stop.set()
        watcher.join()
    lines, status, first_step_s = child.lines, child.status, (first[0] if first else None)
    (dump / "log.txt").write_text("\n".join(lines))
    res = {
        "name": name,
        "status": status,
        "upload_failed": [ln for ln in lines if "upload FAILED" in ln][:1],
        "wall_s": child.wall_s,
        "first_step_s": first_step_s,
        "losses": losses,
        "logged_save_s": saves,
        "prepared_logged_s": [float(m.group(1)) for ln in lines if (m := PREP_RE.search(ln))],
    }
    if times_json.exists():
        res["times"] = json.loads(times_json.read_text())
    if status != "ok":
        res["log_tail"] = lines[-30:]
    return res


def versions() -> dict:
    from bench.throughput import versions as v

    return v()


def pool_note(pool: dict | None) -> str:
    if not pool:
        return ""
    return (
        f" ({pool['gb']} GB; {pool['taken']}/{pool['storages']} used"
        + (f"; {pool['error']}" if pool.get("error") else "")
        + ")"
    )


def to_markdown(meta: dict, results: list[dict], verdict: dict) -> str:
    L = [
        f"# Checkpoint stall: {meta['date']} on {meta['machine']}",
        "",
        "Proxy: Llama 3.1 8B shape, 8 layers (2.80 B params), seq_len 8192, local batch 1, selective op AC, "
        "compile on, one GPU; full checkpoint = model + AdamW state (~33 GB), "
        f"`checkpoint.async_mode = async_with_pinned_mem`, checkpoints at steps {meta['ckpt_steps']} to "
        f"`{meta['ckpt_root']}`. **Proxy result** (1 GPU).",
        "",
        "Software: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v),
        "",
        "Lost training time per checkpoint = sum over the checkpoint step and the "
        f"{meta['window'] - 1} steps after it of (step wall time - median normal step).",
        "",
        "A checkpoint whose upload failed was not written: its small stall means nothing (column 'upload errors').",
        "",
        "| run | status | upload errors | median step s | lost s, 1st ckpt | lost s, 2nd ckpt | "
        "steps 2..first ckpt-1 lost s | staging memory prepared in s (background) | logged save s | "
        "launch to first step s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        s = r.get("stall") or {}
        cks = s.get("checkpoints", [])
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        errs = "; ".join(r.get("upload_errors") or r.get("upload_failed") or []) or "none"
        L.append(
            f"| {r['name']} | {r['status']} | {errs} | {f(s.get('median_step_s'))} | "
            f"{f(cks[0]['lost_s'] if cks else None)} | {f(cks[1]['lost_s'] if len(cks) > 1 else None)} | "
            f"{f(s.get('pre_checkpoint_lost_s'))} | {f(r.get('prepared_s'))}{pool_note(r.get('pool'))} | "
            f"{', '.join(f'{x:.2f}' for x in r.get('logged_save_s', [])) or '-'} | {f(r.get('first_step_s'))} |"
        )
    L += ["", "## Resume check", "", f"```\n{json.dumps(verdict, indent=1)}\n```", ""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("BENCH_STALL_CHILD") == "1":
        child()
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--work", default="/tmp/bench-work")
    p.add_argument("--ckpt-root", default="/dev/shm/bench-ckpt")
    p.add_argument("--interval", type=int, default=80)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated: stock,ours,resume")
    p.add_argument("--per-run-timeout-s", type=float, default=200)
    p.add_argument("--tag", default="checkpoint-stall")
    p.add_argument("--cpu", action="store_true", help="toy-size smoke of the harness (no GPU)")
    a = p.parse_args(argv)
    from bench.assets import build_all

    corpus, tok = build_all(Path(a.work) / "assets")
    root = Path(a.ckpt_root)
    ckpt_steps = [a.interval, 2 * a.interval]
    steps = 2 * a.interval + a.window + 1
    meta = {
        "date": dt.date.today().isoformat(),
        "versions": versions(),
        "ckpt_steps": ckpt_steps,
        "steps": steps,
        "window": a.window,
        "ckpt_root": str(root),
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"),
    }
    meta["machine"] = meta["versions"].get("gpu") or platform.machine()
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", meta["machine"]).strip("-")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{a.tag}-{meta['date']}-{slug}"
    wanted = a.only.split(",") if a.only else ["stock", "ours", "resume"]  # also: ours-reuse-only
    results, verdict = [], {}

    def save():
        Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "verdict": verdict, "results": results}, indent=1))
        Path(f"{stem}.md").write_text(to_markdown(meta, results, verdict))

    variants = {
        "stock": {"BENCH_CKPT_PERF": "0"},
        "ours": {"BENCH_CKPT_PERF": "1"},
        "ours-reuse-only": {"BENCH_CKPT_PERF": "1", "BENCH_PREPARE": "0"},
    }
    for name, env_extra in variants.items():
        if name not in wanted:
            continue
        dump = root / name
        shutil.rmtree(dump, ignore_errors=True)
        r = run(
            name,
            train_args(dump, corpus, tok, steps, a.interval, [], a.cpu),
            env_extra,
            dump,
            a.per_run_timeout_s,
            steps,
        )
        if "times" in r:
            r["prepared_s"] = r["times"].get("prepared_s")
            r["upload_errors"] = r["times"].get("upload_errors")
            r["pool"] = r["times"].get("pool")
            r["stall"] = stall_report(r["times"]["times"], ckpt_steps, a.window)
            del r["times"]["times"]
        (Path(a.work) / f"{name}-log.txt").write_text((dump / "log.txt").read_text())
        results.append(r)
        if name != "ours":
            shutil.rmtree(dump, ignore_errors=True)  # one proxy checkpoint at a time
        print(
            f"{r['name']:20s} {r['status']:8s} "
            + json.dumps({k: r.get("stall", {}).get(k) for k in ("median_step_s", "pre_checkpoint_lost_s")})
            + " lost="
            + str([round(c["lost_s"], 2) for c in r.get("stall", {}).get("checkpoints", [])])
            + f" pool={r.get('pool')} prepared_s={r.get('prepared_s')} first_step_s={r.get('first_step_s')}",
            flush=True,
        )
        save()

    if "resume" in wanted and (root / "ours" / "checkpoint").exists():
        dump = root / "ours"
        last = max(
            int(m.group(1)) for q in (dump / "checkpoint").glob("step-*") if (m := re.search(r"step-(\d+)", q.name))
        )
        r = run(
            "ours-resume",
            train_args(dump, corpus, tok, last + 2, a.interval, ["--checkpoint.load_only"], a.cpu),
            {"BENCH_CKPT_PERF": "0", "BENCH_TIMES_OUT": ""},
            dump,
            a.per_run_timeout_s,
            last + 2,
        )
        ours = next((x for x in results if x["name"] == "ours"), {"losses": {}})
        pairs = {s: (ours["losses"].get(s), r["losses"].get(s)) for s in (last + 1, last + 2)}
        ok = r["status"] == "ok" and all(
            x is not None and y is not None and abs(x - y) <= 2e-2 for x, y in pairs.values()
        )
        resumed = any(f"Training starts at step {last + 1}" in ln for ln in (dump / "log.txt").read_text().splitlines())
        verdict = {
            "checkpoint_step": last,
            "resumed_at_step": last + 1 if resumed else None,
            "loss_original_vs_resumed": {str(k): v for k, v in pairs.items()},
            "loadable_and_equal": bool(ok and resumed),
            "resume_first_step_s": r["first_step_s"],
        }
        r.pop("losses", None)
        results.append(r)
        (Path(a.work) / "resume-log.txt").write_text((dump / "log.txt").read_text())
        print("resume:", json.dumps(verdict), flush=True)
        shutil.rmtree(dump, ignore_errors=True)
        save()
    print(Path(f"{stem}.md").read_text() if results else "no results")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
