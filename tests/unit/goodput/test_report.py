"""summarize: productive, redone, unsaved and away from launch and segment records (synthetic)."""

from __future__ import annotations

import pytest

from torchtitan_runai.goodput.report import (
    CATEGORIES,
    WHOLE_JOB,
    goodput_line,
    so_far,
    summarize,
    tensorboard_scalars,
    work_at,
)


def launch(lid: str, start: float, end: float | None, code: int | None = 0) -> dict:
    return {"version": 1, "kind": "launch", "id": lid, "started_at": start, "ended_at": end, "exit_code": code}


def segment(
    lid: str,
    start: float,
    *,
    resume: int,
    last: int,
    step_s: float = 1.0,
    startup: float = 5.0,
    compile_s: float = 3.0,
    saves: tuple[int, ...] = (),
    durable: int | None = None,
    outcome: str | None = None,
    preemption: float = 0.0,
    stall: float = 0.0,
    teardown: float = 0.0,
) -> dict:
    first = resume + 1
    work = (last - first) * step_s
    seconds = {
        "startup": startup,
        "compile": compile_s,
        "work": work,
        "data_wait": 0.0,
        "checkpoint_stall": stall,
        "upload_wait": 0.0,
        "preemption_save": preemption,
        "teardown": teardown,
        "hang": 0.0,
    }
    return {
        "version": 1,
        "kind": "segment",
        "id": f"seg-{start}",
        "launch": lid,
        "started_at": start,
        "last_seen": start + sum(seconds.values()),
        "outcome": outcome,
        "resume_step": resume,
        "first_step": first,
        "first_step_s": compile_s,
        "last_step": last,
        "work_s": work,
        "saves": {str(s): (s - first) * step_s for s in saves},
        "durable_step": durable,
        "seconds": seconds,
        "timeline": [[0.0, "startup"]],
    }


def test_a_single_finished_run():
    seg = segment(
        "L1", 101.0, resume=0, last=20, saves=(10, 20), durable=20, outcome="finished", stall=1.0, teardown=2.0
    )
    s = summarize([launch("L1", 100.0, seg["last_seen"] + 1.0), seg])
    sec = s["seconds"]
    assert sec["productive"] == pytest.approx(20 * 1.0)  # the first step at the typical step time
    assert sec["compile"] == pytest.approx(3.0 - 1.0)
    assert sec["startup"] == pytest.approx(1.0 + 5.0)  # the launcher's second, then the rank's
    assert sec["teardown"] == pytest.approx(2.0 + 1.0)
    assert sec["redone"] == sec["unsaved"] == sec["away"] == 0
    assert s["accounted_s"] == pytest.approx(s["span_s"])
    assert s["goodput"] == pytest.approx(20 / s["span_s"])


def test_a_kill9_restart_counts_the_lost_steps_as_redone_and_the_gap_as_away():
    # killed at step 15 (last heartbeat), checkpoint 10 complete; the successor resumes from 10
    first = segment("L1", 101.0, resume=0, last=15, saves=(10,), durable=10)
    second = segment("L2", first["last_seen"] + 30.0, resume=10, last=20, saves=(20,), durable=20, outcome="finished")
    records = [
        launch("L1", 100.0, None, None),
        first,
        launch("L2", second["started_at"] - 1.0, second["last_seen"]),
        second,
    ]
    s = summarize(records)
    sec = s["seconds"]
    assert sec["redone"] == pytest.approx(5 * 1.0)  # steps 11..15
    assert sec["productive"] == pytest.approx(10 * 1.0 + 10 * 1.0)
    assert sec["away"] == pytest.approx(29.0)  # the launcher of the killed pod has no end record
    assert sec["unsaved"] == 0
    assert s["accounted_s"] == pytest.approx(s["span_s"])
    assert "1 restart(s)" in goodput_line(s) and "away 29.0s between pods" in goodput_line(s)


def test_before_the_successor_resumes_the_lost_steps_are_unsaved_not_redone():
    first = segment("L1", 101.0, resume=0, last=15, saves=(10,), durable=10)
    starting = dict(
        segment("L2", first["last_seen"] + 5.0, resume=0, last=0),
        resume_step=None,
        first_step=None,
        last_step=None,
        first_step_s=None,
        work_s=0.0,
        seconds={
            "startup": 4.0,
            **{
                k: 0.0
                for k in (
                    "compile",
                    "work",
                    "data_wait",
                    "checkpoint_stall",
                    "upload_wait",
                    "preemption_save",
                    "teardown",
                    "hang",
                )
            },
        },
    )
    starting["last_seen"] = starting["started_at"] + 4.0
    s = summarize([first, starting])
    assert s["seconds"]["unsaved"] == pytest.approx(5.0)
    assert s["seconds"]["redone"] == 0
    assert s["accounted_s"] == pytest.approx(s["span_s"])


def test_a_preemption_save_keeps_every_step():
    first = segment("L1", 101.0, resume=0, last=15, saves=(10, 15), durable=15, outcome="preempted", preemption=4.0)
    second = segment("L1b", first["last_seen"] + 2.0, resume=15, last=20, saves=(20,), durable=20, outcome="finished")
    s = summarize([first, second])
    assert s["seconds"]["redone"] == 0 and s["seconds"]["unsaved"] == 0
    assert s["seconds"]["preemption_save"] == pytest.approx(4.0)
    assert s["seconds"]["away"] == pytest.approx(2.0)


def test_a_resume_from_an_older_checkpoint_cuts_back_earlier_segments_too():
    a = segment("L", 100.0, resume=0, last=30, saves=(10, 20, 30), durable=30, outcome="preempted")
    b = segment("L", a["last_seen"], resume=30, last=35, saves=(), durable=30)
    c = segment("L", b["last_seen"], resume=20, last=40, saves=(40,), durable=40, outcome="finished")  # 30 damaged
    s = summarize([a, b, c])
    # a: steps 21..30 lost; b: all of it (31..35); c keeps everything
    assert s["seconds"]["redone"] == pytest.approx(10 + 5)
    assert s["seconds"]["productive"] == pytest.approx(20 + 20)


def test_work_at_is_exact_at_saves_and_linear_between():
    seg = segment("L", 0.0, resume=100, last=200, step_s=2.0, saves=(150,))
    seg["saves"]["150"] = 90.0  # a slow stretch before 150
    assert work_at(seg, 100, 2.0) == 0.0
    assert work_at(seg, 101, 2.0) == pytest.approx(2.0)
    assert work_at(seg, 150, 2.0) == pytest.approx(92.0)
    assert work_at(seg, 200, 2.0) == pytest.approx(2.0 + seg["work_s"])
    assert 92.0 < work_at(seg, 175, 2.0) < 2.0 + seg["work_s"]


def test_line_and_scalars_name_every_category():
    s = summarize([segment("L", 0.0, resume=0, last=10, durable=5, saves=(5,))])
    line = goodput_line(s)
    assert line.startswith("goodput: ") and "unsaved 5.0s" in line
    assert set(tensorboard_scalars(s)) == {f"goodput/{c}(s)" for c in CATEGORIES} | {"goodput/goodput(%)"}
    assert goodput_line(summarize([])) == "goodput: nothing measured yet"
    # the launcher's figure at exit and rank 0's progress figures say what each covers
    assert goodput_line(s, WHOLE_JOB).startswith("goodput of the whole job (every launch, start-up to exit): ")
    assert goodput_line(s, so_far(10)).startswith("goodput so far (step 10): ")


def test_a_segment_under_another_nodes_launcher_is_not_counted_twice():
    # rank 0 ran on node 1, whose launcher keeps no record: node 0's launcher spans it
    seg = dict(segment("L-node1", 102.0, resume=0, last=10, saves=(10,), durable=10, outcome="finished"), launch=None)
    s = summarize([launch("L0", 100.0, seg["last_seen"] + 1.5), seg])
    assert s["accounted_s"] == pytest.approx(s["span_s"])
    assert s["seconds"]["startup"] == pytest.approx(2.0 + 5.0) and s["seconds"]["teardown"] == pytest.approx(1.5)
