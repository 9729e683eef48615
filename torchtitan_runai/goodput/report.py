"""Goodput from the ledger's records: where a job's wall time went, as numbers, a line and a PNG.

``summarize(records)`` turns the launch and segment records (``ledger``) into one breakdown whose
categories add up to the job's span, first launcher start to last known moment:

- ``productive``: steps whose progress survives (the first step of each segment at the segment's
  typical step time; the rest of that step is ``compile``);
- ``startup``: from a launcher's start to its first segment's training loop, and between segments
  of one launch (torchrun restarting its workers);
- ``compile``, ``data_wait``, ``checkpoint_stall``, ``upload_wait``, ``preemption_save``, ``hang``:
  as the ledger measured them;
- ``redone``: steps a later segment trained again because it resumed from an older step;
- ``unsaved``: steps after the newest complete checkpoint that nothing has resumed past yet (at
  risk: they become productive at the next save, redone if the job dies first);
- ``teardown``: after the training loop until the launcher's exit;
- ``away``: covered by no launcher and no segment (between a pod's death and its successor's
  launch; it includes up to one ledger heartbeat of a killed pod's last seconds).

Goodput is ``productive / (span - away)``, the share of the time the job held its pods; the share
of the whole span is there too (``productive_of_span``).
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from torchtitan_runai.goodput.ledger import RAW_STATES

CATEGORIES = (
    "productive",
    "startup",
    "compile",
    "checkpoint_stall",
    "upload_wait",
    "preemption_save",
    "redone",
    "data_wait",
    "hang",
    "teardown",
    "unsaved",
    "away",
)
LABELS = {
    "productive": "productive",
    "startup": "start-up",
    "compile": "compile/first step",
    "checkpoint_stall": "checkpoint stalls",
    "upload_wait": "upload waits",
    "preemption_save": "preemption saves",
    "redone": "redone steps",
    "data_wait": "data waits",
    "hang": "hangs",
    "teardown": "teardown",
    "unsaved": "unsaved steps",
    "away": "away",
}


def _segments(records: Iterable[dict]) -> list[dict]:
    return sorted((r for r in records if r.get("kind") == "segment"), key=lambda r: r["started_at"])


def _launches(records: Iterable[dict]) -> list[dict]:
    return sorted((r for r in records if r.get("kind") == "launch"), key=lambda r: r["started_at"])


def typical_step_s(seg: dict) -> float | None:
    """Mean time of a segment's steps after its first one."""
    first, last = seg.get("first_step"), seg.get("last_step")
    if first is None or last is None or last <= first:
        return None
    return seg.get("work_s", 0.0) / (last - first)


def first_step_share(seg: dict, job_typical: float | None = None) -> float:
    """What a segment's first step is worth as a step: its typical step time (the job's when it has
    none), never more than the first step took; the rest of the first step is compilation."""
    typical = typical_step_s(seg) or job_typical
    first_s = seg.get("first_step_s")
    if seg.get("first_step") is None or first_s is None or typical is None:
        return 0.0
    return min(typical, first_s)


def work_at(seg: dict, step: int, typical: float) -> float:
    """Seconds of training in ``seg`` up to (and including) ``step``: exact at its saves, its first
    and last step; linear between them."""
    resume, first, last = seg.get("resume_step"), seg.get("first_step"), seg.get("last_step")
    if resume is None or first is None or step <= resume:
        return 0.0
    points = [(resume, 0.0), (first, typical)]
    points += [(int(s), typical + w) for s, w in seg.get("saves", {}).items() if int(s) >= first]
    points.append((last, typical + seg.get("work_s", 0.0)))
    points = sorted(set(points))
    if step >= last:
        return typical + seg.get("work_s", 0.0)
    for (s0, w0), (s1, w1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return w0 if s1 == s0 else w0 + (w1 - w0) * (step - s0) / (s1 - s0)
    return 0.0


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def summarize(records: Iterable[dict], now: float | None = None) -> dict[str, Any]:
    """The breakdown (see the module docstring). ``now`` only matters for a launch with no end and no
    segment: it is counted until ``now`` (default: its start)."""
    records = list(records)
    segments, launches = _segments(records), _launches(records)
    totals = {c: 0.0 for c in CATEGORIES}
    if not segments and not launches:
        return {
            "span_s": 0.0,
            "seconds": totals,
            "goodput": None,
            "productive_of_span": None,
            "segments": [],
            "launches": 0,
            "steps": None,
        }
    # typical step time: each segment's own, else the job's
    typicals = [t for t in (typical_step_s(s) for s in segments) if t is not None]
    job_typical = sorted(typicals)[len(typicals) // 2] if typicals else None

    # what survives of each segment's steps: later resumes cut it back
    details = []
    for i, seg in enumerate(segments):
        raw = {s: float(seg.get("seconds", {}).get(s, 0.0)) for s in RAW_STATES}
        typical = first_step_share(seg, job_typical)
        trained = typical + raw["work"] if seg.get("first_step") is not None else 0.0
        last = seg.get("last_step")
        resumes = [r for r in (s.get("resume_step") for s in segments[i + 1 :]) if r is not None]
        keep_step = last
        if resumes:  # a successor resumed: what it did not resume past was trained again
            keep_step = min([last, *resumes]) if last is not None else None
            kept = work_at(seg, keep_step, typical) if keep_step is not None else 0.0
            totals["redone"] += trained - kept
        elif seg.get("outcome") == "finished":
            kept = trained
        else:  # nothing resumed yet: what the newest complete checkpoint holds is safe, the rest at risk
            durable = seg.get("durable_step")
            kept = work_at(seg, durable, typical) if durable is not None else 0.0
            totals["unsaved"] += trained - kept
        totals["productive"] += kept
        totals["compile"] += raw["compile"] - (typical if seg.get("first_step") is not None else 0.0)
        for s in ("startup", "data_wait", "checkpoint_stall", "upload_wait", "preemption_save", "teardown", "hang"):
            totals[s] += raw[s]
        details.append(
            {
                "id": seg.get("id"),
                "started_at": seg["started_at"],
                "last_seen": seg["last_seen"],
                "outcome": seg.get("outcome"),
                "resume_step": seg.get("resume_step"),
                "last_step": last,
                "durable_step": seg.get("durable_step"),
                "kept_step": keep_step,
                "saves": len(seg.get("saves", {})),
                "timeline": seg.get("timeline", []),
                "seconds": raw,
            }
        )

    # launcher time outside its segments: start-up before and between them, teardown after
    intervals = [(s["started_at"], s["last_seen"]) for s in segments]
    gaps: list[tuple[float, float, str]] = []  # launcher-only time, for the plot
    # A launch's segments are those that ran inside its span (by time, not by id: on several nodes
    # rank 0 may run under another node's launcher); a launcher killed without an end record ended
    # with the last segment that started before the next launch.
    for k, launch in enumerate(launches):
        start = launch["started_at"]
        end = launch.get("ended_at")
        if end is None:
            before = launches[k + 1]["started_at"] if k + 1 < len(launches) else float("inf")
            ran = [s["last_seen"] for s in segments if start <= s["started_at"] < before]
            end = max(ran or [now if now is not None and k + 1 == len(launches) else start])
        mine = [s for s in segments if s["started_at"] < end and s["last_seen"] > start]
        intervals.append((start, end))
        cursor = start
        for seg in mine:
            totals["startup"] += max(0.0, seg["started_at"] - cursor)
            gaps.append((cursor, seg["started_at"], "startup"))
            cursor = max(cursor, seg["last_seen"])
        end = max(end, cursor)
        tail = "teardown" if mine else "startup"
        totals[tail] += max(0.0, end - cursor)
        gaps.append((cursor, end, tail))
    begin = min(a for a, _ in intervals)
    finish = max(b for _, b in intervals)
    span = finish - begin
    totals["away"] = max(0.0, span - _union(intervals))
    held = span - totals["away"]
    last_step = next((s.get("last_step") for s in reversed(segments) if s.get("last_step") is not None), None)
    return {
        "span_s": span,
        "held_s": held,
        "begin": begin,
        "end": finish,
        "seconds": totals,
        "goodput": totals["productive"] / held if held > 0 else None,
        "productive_of_span": totals["productive"] / span if span > 0 else None,
        "segments": details,
        "launches": len(launches),
        "steps": last_step,
        "gaps": [g for g in gaps if g[1] > g[0]],
        "saves": sum(len(s.get("saves", {})) for s in segments),
        "accounted_s": sum(totals.values()),
    }


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def short(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else clock(seconds)


WHOLE_JOB = "goodput of the whole job (every launch, start-up to exit)"
"""The launcher's label at its exit: the one figure a finished run prints (``report_at_exit``)."""


def so_far(step: int) -> str:
    """Rank 0's label every ``goodput.log_freq`` steps: the same ledger, up to this step (no teardown
    yet, the launcher's exit not known): a progress figure, not the job's."""
    return f"goodput so far (step {step})"


def goodput_line(summary: dict[str, Any], label: str = "goodput") -> str:
    """One line in the step-line style: ``label``, the share, then every non-zero category."""
    if summary.get("goodput") is None:
        return f"{label}: nothing measured yet"
    sec = summary["seconds"]
    parts = [
        f"{LABELS[c]} {short(sec[c])}"
        for c in CATEGORIES
        if c not in ("productive", "away", "unsaved") and sec[c] >= 0.05
    ]
    tail = []
    if sec["unsaved"] >= 0.05:
        tail.append(f"unsaved {short(sec['unsaved'])}")
    if sec["away"] >= 0.05:
        tail.append(f"away {short(sec['away'])} between pods")
    restarts = max(0, len(summary["segments"]) - 1)
    return (
        f"{label}: {100 * summary['goodput']:.1f}% of {clock(summary['held_s'])} "
        f"(productive {short(sec['productive'])}; {', '.join(parts) or 'no losses'})"
        + (f"; {'; '.join(tail)}" if tail else "")
        + f"; {restarts} restart(s), {summary.get('saves', 0)} save(s)"
    )


def tensorboard_scalars(summary: dict[str, Any]) -> dict[str, float]:
    out = {f"goodput/{c}(s)": v for c, v in summary["seconds"].items()}
    if summary.get("goodput") is not None:
        out["goodput/goodput(%)"] = 100 * summary["goodput"]
    return out


def json_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary file's content: everything but the per-segment timelines."""
    out = {k: v for k, v in summary.items() if k != "segments"}
    out["segments"] = [{k: v for k, v in s.items() if k != "timeline"} for s in summary["segments"]]
    out["written_at"] = time.time()
    out["categories"] = {c: LABELS[c] for c in CATEGORIES}
    return out


COLORS = {
    "productive": "#2ca02c",
    "work": "#2ca02c",
    "startup": "#7f7f7f",
    "compile": "#bcbd22",
    "checkpoint_stall": "#1f77b4",
    "upload_wait": "#17becf",
    "preemption_save": "#ff7f0e",
    "redone": "#d62728",
    "data_wait": "#9467bd",
    "hang": "#8c564b",
    "teardown": "#e377c2",
    "unsaved": "#98df8a",
    "away": "#ffffff",
}


def plot(summary: dict[str, Any], path) -> None:
    """A PNG: the timeline of every segment (what rank 0 was doing, left to right) over the totals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), gridspec_kw={"height_ratios": [1, 1.3]})
    begin = summary.get("begin", 0.0)
    for a, b, state in summary.get("gaps", []):  # the launcher alone: before, between and after its workers
        top.barh(0, b - a, left=a - begin, height=0.6, color=COLORS[state], edgecolor="none")
    for seg in summary["segments"]:
        marks = seg["timeline"] or [[0.0, "startup"]]
        end = seg["last_seen"] - seg["started_at"]
        for (t0, state), nxt in zip(marks, [*marks[1:], [end, None]]):
            top.barh(
                0,
                max(nxt[0] - t0, 0.0),
                left=seg["started_at"] - begin + t0,
                height=0.6,
                color=COLORS.get(state, "#cccccc"),
                edgecolor="none",
            )
        top.axvline(seg["started_at"] - begin, color="black", linewidth=0.5)
    top.set_yticks([])
    top.set_xlabel("seconds since the first launch (rank 0; a black line starts each process; blank: away)")
    top.set_title(f"goodput {100 * (summary.get('goodput') or 0):.1f}% of {clock(summary.get('held_s', 0))}")
    sec = summary["seconds"]
    shown = [c for c in CATEGORIES if sec[c] >= 0.05]
    bottom.barh(range(len(shown)), [sec[c] for c in shown], color=[COLORS[c] for c in shown], edgecolor="black")
    bottom.set_yticks(range(len(shown)), [LABELS[c] for c in shown])
    bottom.invert_yaxis()
    bottom.set_xlabel("seconds")
    for i, c in enumerate(shown):
        bottom.text(sec[c], i, f" {short(sec[c])}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
