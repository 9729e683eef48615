"""The ledger's state machine on a fake clock: every second in one state, states sum to the life."""

from __future__ import annotations

import json
import os

import pytest

from torchtitan_runai.goodput.ledger import (
    RAW_STATES,
    LaunchRecord,
    Ledger,
    NullLedger,
    process_start_wall,
    read_records,
)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def tick(self, s: float) -> None:
        self.t += s


def ledger(tmp_path, clock, started_ago: float = 3.0) -> Ledger:
    return Ledger(
        tmp_path,
        heartbeat_s=3600,
        launch_id="launch-x",
        started_at=5000.0 - started_ago,
        clock=clock,
        wall=lambda: 5000.0 + (clock() - 1000.0),
    )


def test_states_add_up_to_the_life_of_the_process(tmp_path):
    clock = Clock()
    led = ledger(tmp_path, clock)
    clock.tick(7)  # building the model
    led.loop_started(0)
    clock.tick(4)  # the first step, compiling
    led.step_done(1)
    for step in range(2, 6):
        with led.during("data_wait"):
            clock.tick(0.25)
        clock.tick(0.75)
        led.step_done(step)
    led.saving(5)
    with led.during("upload_wait"):
        clock.tick(2)
    with led.during("checkpoint_stall"):
        clock.tick(1)
    led.marked(5)
    clock.tick(1)
    led.step_done(6)
    led.switch("preemption_save")
    clock.tick(3)
    with led.during("checkpoint_stall"):  # the save inside the preemption save stays preemption
        clock.tick(2)
    led.end("preempted")
    rec = read_records(tmp_path)[0]
    sec = rec["seconds"]
    assert set(sec) == set(RAW_STATES)
    assert sec["startup"] == pytest.approx(3 + 7)
    assert sec["compile"] == pytest.approx(4) and rec["first_step_s"] == pytest.approx(4)
    assert sec["data_wait"] == pytest.approx(1.0)
    assert sec["work"] == pytest.approx(4 * 0.75 + 1)
    assert sec["upload_wait"] == pytest.approx(2) and sec["checkpoint_stall"] == pytest.approx(1)
    assert sec["preemption_save"] == pytest.approx(5)
    assert sum(sec.values()) == pytest.approx(rec["last_seen"] - rec["started_at"])
    assert rec["saves"] == {"5": pytest.approx(3.0)}  # work up to step 5, not the save's own time
    assert (rec["resume_step"], rec["first_step"], rec["last_step"], rec["durable_step"]) == (0, 1, 6, 5)
    assert rec["outcome"] == "preempted" and rec["launch"] == "launch-x"
    assert [label for _, label in rec["timeline"]][:4] == ["startup", "compile", "work", "upload_wait"]


def test_a_hang_takes_the_time_since_the_last_progress(tmp_path):
    clock = Clock()
    led = ledger(tmp_path, clock, started_ago=0)
    led.loop_started(10)
    clock.tick(2)
    led.step_done(11)
    clock.tick(1)
    progress = clock()
    clock.tick(30)  # stuck in a collective; the heartbeat keeps crediting it as work
    led.flush()
    clock.tick(30)
    led.hung(progress)
    sec = read_records(tmp_path)[0]["seconds"]
    assert sec["work"] == pytest.approx(1) and sec["hang"] == pytest.approx(60)
    assert read_records(tmp_path)[0]["outcome"] == "hung"


def test_the_heartbeat_writes_a_running_snapshot(tmp_path):
    led = Ledger(tmp_path, heartbeat_s=0.05).start()
    try:
        led.loop_started(0)
        first = read_records(tmp_path)[0]
        for _ in range(100):
            now = read_records(tmp_path)[0]
            if now["last_seen"] > first["last_seen"] and now["resume_step"] == 0:
                break
            os.sched_yield()
            import time

            time.sleep(0.02)
        assert now["resume_step"] == 0 and now["last_seen"] > first["last_seen"]
        assert now["outcome"] is None
    finally:
        led.stop()


def test_launch_records_and_the_process_start(tmp_path):
    rec = LaunchRecord(tmp_path).open()
    rec.close(143)
    found = read_records(tmp_path)
    assert [(r["kind"], r["exit_code"]) for r in found] == [("launch", 143)]
    assert found[0]["ended_at"] >= found[0]["started_at"]
    started = process_start_wall()
    import time

    assert started is not None and time.time() - 3600 < started <= time.time()


def test_unreadable_and_foreign_files_are_ignored(tmp_path):
    (tmp_path / "segment-1-2.json").write_text("{not json")
    (tmp_path / "notes.json").write_text(json.dumps({"version": 1, "kind": "segment"}))
    assert read_records(tmp_path) == []
    assert read_records(tmp_path / "missing") == []


def test_the_null_ledger_takes_every_call():
    null = NullLedger()
    with null.during("data_wait"):
        null.loop_started(0)
        null.step_done(1)
        null.saving(1)
        null.marked(1)
    null.end("finished")
    assert null.records() is None


def test_flushes_never_overlap_and_the_last_write_is_the_newest(tmp_path, monkeypatch):
    # a slow volume: the GIL is free while a write is in the kernel, so the heartbeat thread and the
    # main thread would write the same temp file at once (seen as "Extra data" JSON) without a lock
    import threading
    import time

    from torchtitan_runai.goodput import ledger as ledger_module

    real, active, overlaps = ledger_module.write_json_atomic, [0], [0]

    def slow_write(path, data):
        active[0] += 1
        overlaps[0] = max(overlaps[0], active[0])
        time.sleep(0.005)
        real(path, data)
        active[0] -= 1

    monkeypatch.setattr(ledger_module, "write_json_atomic", slow_write)
    led = Ledger(tmp_path, heartbeat_s=3600)
    led.loop_started(0)
    threads = [threading.Thread(target=lambda: [led.flush() for _ in range(10)]) for _ in range(4)]
    for th in threads:
        th.start()
    led.end("finished")
    for th in threads:
        th.join()
    assert overlaps[0] == 1
    (rec,) = read_records(tmp_path)
    assert rec["outcome"] == "finished"  # no older snapshot landed after the last one


def test_the_launchers_record_is_written_and_leaves_the_environment_to_the_launcher(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from torchtitan_runai import goodput

    monkeypatch.delenv(goodput.LAUNCH_ID_ENV, raising=False)
    config = SimpleNamespace(
        job=SimpleNamespace(dump_folder=str(tmp_path)),
        goodput=SimpleNamespace(enable=True),
        checkpoint=SimpleNamespace(enable=True, folder="checkpoint"),
    )
    record = goodput.build_launch_record(config)
    assert (tmp_path / "checkpoint" / "goodput" / f"{record.id}.json").is_file()
    assert goodput.LAUNCH_ID_ENV not in os.environ  # launcher.workers gives it to the workers
    config.goodput.enable = False
    assert goodput.build_launch_record(config) is None
