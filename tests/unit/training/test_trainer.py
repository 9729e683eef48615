"""training.trainer without a training run: run()'s exits and teardowns, RunaiTrainer's wiring and its
step-boundary seams, on fakes for torchtitan's Trainer, the checkpointer, the ledger and the watchdog.

``os._exit`` (how run() and a signal before the first step leave) raises ``Exited`` here, and the
process-wide setup run() does first (warnings, torchtitan's logger, the device globals) is skipped.
tests/integration runs all of it for real.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from itertools import islice
from types import SimpleNamespace

import pytest
import torch

from torchtitan_runai import goodput, lifetime, upstream
from torchtitan_runai.checkpoint import ownership
from torchtitan_runai.config import Resilience
from torchtitan_runai.goodput.ledger import Ledger, NullLedger
from torchtitan_runai.training import log_filter, log_format, signals
from torchtitan_runai.training import trainer as trainer_mod
from torchtitan_runai.training.checkpoint import staging
from torchtitan_runai.training.checkpoint.manager import (
    Preempted,
    RunaiCheckpointManager,
)
from torchtitan_runai.training.watchdog import Watchdog


class Exited(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@pytest.fixture
def exits(monkeypatch):
    """The trainer's way out (errors.flush_and_exit: flush, then os._exit) raises Exited instead."""

    def leave(code):
        raise Exited(code)

    monkeypatch.setattr(trainer_mod, "flush_and_exit", leave)


class Events(list):
    """What the fakes were asked to do, in order."""

    def fake(self, name: str, result=None):
        def record(*args, **kwargs):
            self.append((name, *args, *kwargs.values()))
            return result

        return record

    def names(self) -> list[str]:
        return [e[0] for e in self]


class FakeLedger:
    def __init__(self, events: Events):
        self.events = events
        for name in ("switch", "loop_started", "step_done", "end", "hung"):
            setattr(self, name, events.fake(f"ledger.{name}"))

    @contextlib.contextmanager
    def during(self, state):
        self.events.append(("ledger.during", state))
        yield
        self.events.append(("ledger.during_end", state))


class FakeCheckpointer:
    def __init__(self, events: Events, upload=True):
        self.upload = SimpleNamespace(kill=events.fake("upload.kill")) if upload else None
        self.finish_async = events.fake("checkpointer.finish_async")
        self.save_now = events.fake("checkpointer.save_now", "step 7 checkpoint marked")


def fake_trainer(events: Events, step=0, **attrs):
    """What run() and the teardowns touch of a RunaiTrainer."""
    t = SimpleNamespace(
        ledger=FakeLedger(events),
        watchdog=SimpleNamespace(stop=events.fake("watchdog.stop")),
        checkpointer=FakeCheckpointer(events),
        stop_flag=signals.StopFlag(),
        metrics_processor=SimpleNamespace(close=events.fake("metrics.close")),
        close=events.fake("trainer.close"),
        step=step,
    )
    for key, value in attrs.items():
        setattr(t, key, value)
    return t


# ---------------------------------------------------------------------------------------------
# run()


@pytest.fixture
def run_with(monkeypatch, exits):
    """run(argv) with a fake trainer whose train() is ``train(trainer)``.

    Returns (the exit code, or the exception run() raised; what the fakes were asked; the config)."""
    events = Events()
    config = SimpleNamespace(training=SimpleNamespace(steps=10))
    events.asked_for_parent_death = []  # (never on the test's own process: its parent is pytest's runner)
    monkeypatch.setattr(trainer_mod.lifetime, "die_with_parent", lambda *a: events.asked_for_parent_death.append(a))
    monkeypatch.setattr(log_filter, "quiet_expected_noise", lambda *a, **k: None)
    monkeypatch.setattr(upstream, "init_logger", lambda *a, **k: None)
    monkeypatch.setattr(trainer_mod.device, "select_device", lambda *a, **k: None)
    monkeypatch.setattr(
        trainer_mod,
        "parse_job_config",
        lambda argv, world_size, resume: events.append(("parse", argv, world_size, resume)) or config,
    )
    monkeypatch.setattr(trainer_mod, "export_at_end", events.fake("export_at_end"))

    def run(train, argv=("--training.steps", "10")):
        def build(job_config):
            assert job_config is config
            trainer = fake_trainer(events)
            trainer.train = lambda: train(trainer)
            return trainer

        monkeypatch.setattr(trainer_mod, "RunaiTrainer", build)
        try:
            trainer_mod.run(list(argv))
        except Exited as done:
            return done.code, events, config
        except RuntimeError as error:  # a failed run (train() below raises it)
            return error, events, config
        raise AssertionError("run() returned: it must leave through os._exit or raise")

    return run


def test_a_rank_first_asks_to_die_with_its_launcher(run_with, monkeypatch):
    # a rank of a launcher killed with kill -9 trained on and saved beside the next run (issue 24)
    monkeypatch.setenv(lifetime.LAUNCHER_ENV, "4242 1234567")
    _, events, _ = run_with(lambda trainer: setattr(trainer, "step", 10))
    assert events.asked_for_parent_death == [(4242, signal.SIGKILL)]
    monkeypatch.delenv(lifetime.LAUNCHER_ENV)  # train.py outside the launcher: its own parent
    _, events, _ = run_with(lambda trainer: setattr(trainer, "step", 10))
    assert events.asked_for_parent_death[1:] == [(None, signal.SIGKILL)]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_preempted_run_exits_128_plus_the_signal_without_the_end_of_run_teardown(run_with, signum, code):
    def train(trainer):
        trainer.step = 7
        raise Preempted(signum)

    exit_code, events, _ = run_with(train)
    assert exit_code == code
    # only what must not be lost, then the ledger's outcome; no close, no barrier, no export
    assert events.names()[1:] == ["watchdog.stop", "upload.kill", "metrics.close", "ledger.end"]
    assert events[-1] == ("ledger.end", "preempted")


def test_a_finished_run_tears_down_exports_then_exits_0(run_with, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")

    def train(trainer):
        trainer.step = 10

    exit_code, events, config = run_with(train)
    assert exit_code == 0
    assert events[0] == ("parse", ["--training.steps", "10"], 4, True)  # the world size a resume adapts to
    # the export after the process group is gone (export_at_end itself picks rank 0)
    assert events[1:] == [
        ("watchdog.stop",),
        ("checkpointer.finish_async", True),
        ("trainer.close",),
        ("export_at_end", config, 10, 3),
        ("ledger.end", "finished"),
    ]


def test_a_run_stopped_before_its_last_step_is_not_exported(run_with):
    def train(trainer):
        trainer.step = 4

    exit_code, events, _ = run_with(train)
    assert exit_code == 0
    assert "export_at_end" not in events.names() and events[-1] == ("ledger.end", "stopped")


def test_a_failed_run_is_a_traceback_not_an_exit(run_with):
    def train(trainer):
        raise RuntimeError("NCCL timeout")

    error, events, _ = run_with(train)
    assert isinstance(error, RuntimeError)  # torchrun records it; the launcher names the rank
    assert events[1:] == [("ledger.end", "failed"), ("watchdog.stop",), ("trainer.close",)]


# ---------------------------------------------------------------------------------------------
# The teardowns


def test_teardown_after_preemption_tolerates_what_was_never_built():
    events = Events()
    trainer_mod._teardown_preempted(
        fake_trainer(events, checkpointer=FakeCheckpointer(events, upload=False), metrics_processor=None)
    )
    assert events == [("watchdog.stop",)]
    bare = fake_trainer(events)
    del bare.checkpointer, bare.metrics_processor  # torchtitan's __init__ failed before building them
    trainer_mod._teardown_preempted(bare)


def test_teardown_waits_for_the_upload_then_closes_without_a_process_group():
    events = Events()
    assert not torch.distributed.is_initialized()
    trainer_mod._teardown(fake_trainer(events))
    assert events == [("watchdog.stop",), ("checkpointer.finish_async", True), ("trainer.close",)]
    events.clear()
    bare = fake_trainer(events)
    del bare.checkpointer
    trainer_mod._teardown(bare)
    assert events == [("watchdog.stop",), ("trainer.close",)]


# ---------------------------------------------------------------------------------------------
# RunaiTrainer: the wiring (torchtitan's __init__ faked)


def test_the_ledger_comes_first_and_the_watchdog_and_checkpointer_are_wired_to_it(tmp_path, monkeypatch):
    events = Events()
    ledger = FakeLedger(events)
    checkpointer = FakeCheckpointer(events)
    model_parts = [torch.nn.Linear(2, 2)]
    config = SimpleNamespace(
        job=SimpleNamespace(dump_folder=str(tmp_path)),
        checkpoint=SimpleNamespace(folder="ck", enable=False),
        resilience=Resilience(hang_timeout_seconds=321, heartbeat_seconds=4),
        optimizer=SimpleNamespace(name="AdamW"),
    )
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / ownership.OWNER).write_text(json.dumps({"job": "job-of-the-folder"}))

    def torchtitan_init(self, job_config):
        events.append(("torchtitan.__init__",))
        self.job_config, self.checkpointer, self.model_parts = job_config, checkpointer, model_parts
        self.parallel_dims = SimpleNamespace(world_size=8, dp_replicate=2, dp_shard=2)

    monkeypatch.setattr(goodput, "build_ledger", lambda job_config: events.append(("build_ledger",)) or ledger)
    monkeypatch.setattr(log_format, "configure_logging_from_env", lambda *a, **k: None)
    monkeypatch.setattr(log_filter, "install_person_filter", lambda **k: None)
    monkeypatch.setattr(signals.StopFlag, "install", events.fake("signals.install"))
    monkeypatch.setattr(Watchdog, "start", events.fake("watchdog.start"))
    monkeypatch.setattr(upstream.Trainer, "__init__", torchtitan_init)
    monkeypatch.setattr(RunaiCheckpointManager, "adopt", events.fake("adopt"))
    monkeypatch.setattr(staging, "install", events.fake("staging.install", "pool"))

    t = trainer_mod.RunaiTrainer(config)
    assert events.names() == [
        "build_ledger",
        "signals.install",
        "torchtitan.__init__",
        "adopt",
        "staging.install",
        "watchdog.start",
    ]
    assert events[3] == ("adopt", checkpointer, config, 8, 4, "job-of-the-folder")  # dp = replicate x shard
    assert events[4] == ("staging.install", checkpointer, config.checkpoint, None, model_parts, "AdamW")
    assert t.ledger is ledger and t.staging_pool == "pool"
    assert (t.watchdog.timeout_s, t.watchdog.beat_s) == (321, 4)
    assert t.watchdog.on_hang == ledger.hung  # a hang is charged to the ledger before the exit
    assert t.checkpointer.busy == t.watchdog.paused and t.checkpointer.ledger is ledger  # saves pause the watchdog
    assert t.stop_flag.before_first_step == t._leave_now


# ---------------------------------------------------------------------------------------------
# RunaiTrainer: the seams torchtitan's loop calls (a bare instance, torchtitan's methods faked)


def bare_trainer(events: Events, steps=10, log_freq=5, step=0):
    t = object.__new__(trainer_mod.RunaiTrainer)
    t.job_config = SimpleNamespace(training=SimpleNamespace(steps=steps), goodput=SimpleNamespace(log_freq=log_freq))
    t.step = step
    t.device = torch.device("cpu")
    t.ledger = FakeLedger(events)
    t.checkpointer = FakeCheckpointer(events)
    t.watchdog = Watchdog(timeout_s=60)
    t.stop_flag = signals.StopFlag()
    t.log_startup_summary = events.fake("startup_summary")
    t.report_goodput = lambda final=False: events.append(("report_goodput", t.step))
    return t


def boundary(t, step):
    t.step = step
    return t.should_continue_training()


def test_step_boundaries_feed_the_watchdog_and_the_ledger():
    events = Events()
    t = bare_trainer(events, steps=10, log_freq=5, step=6)
    assert boundary(t, 6) and not t.watchdog.armed  # loading and compiling do not count against the timeout
    assert events == [("ledger.loop_started", 6), ("startup_summary",), ("checkpointer.finish_async", False)]
    events.clear()
    assert boundary(t, 7) and t.watchdog.armed and t.watchdog.step == 7
    assert events == [("ledger.step_done", 7), ("checkpointer.finish_async", False)]
    events.clear()
    assert boundary(t, 8) is True
    assert boundary(t, 9) is True and "report_goodput" not in events.names()
    events.clear()
    assert boundary(t, 10) is False  # torchtitan's own test: step < training.steps
    assert events[-2:] == [("report_goodput", 10), ("ledger.switch", "teardown")]


def test_goodput_is_reported_every_log_freq_steps():
    events = Events()
    t = bare_trainer(events, steps=100, log_freq=5)
    for step in range(12):
        boundary(t, step)
    assert [e[1] for e in events if e[0] == "report_goodput"] == [5, 10]  # not at the first boundary


def test_a_signal_at_a_boundary_saves_then_stops_every_rank():
    events = Events()
    t = bare_trainer(events)
    boundary(t, 6)
    events.clear()
    t.stop_flag.signum, t.stop_flag.when = signal.SIGTERM, 1234.5
    with pytest.raises(Preempted) as stop:
        boundary(t, 7)
    assert stop.value.signum == signal.SIGTERM
    assert events[-2:] == [("ledger.switch", "preemption_save"), ("checkpointer.save_now", 7, 1234.5)]
    assert ("ledger.switch", "teardown") not in events


def test_a_signal_before_the_first_step_leaves_at_once_after_it_at_the_boundary(monkeypatch, exits):
    events = Events()
    t = bare_trainer(events)
    t.stop_flag.before_first_step = t._leave_now
    with pytest.raises(Exited) as done:
        t.stop_flag._handler(signal.SIGTERM, None)
    assert done.value.code == 143 and events == [("ledger.end", "preempted")]

    t = bare_trainer(events)
    t.stop_flag.before_first_step = t._leave_now
    t.step_trace = t.data_trace = SimpleNamespace(enabled=False)
    t.lr_schedulers = SimpleNamespace(schedulers=[SimpleNamespace(get_last_lr=lambda: [1e-3])])
    monkeypatch.setattr(upstream.Trainer, "train_step", lambda self, data: setattr(self, "step", self.step + 1))
    t.train_step(iter(()))
    t.stop_flag._handler(signal.SIGTERM, None)  # now only recorded: the boundary saves the step just trained
    assert t.stop_flag.signum == signal.SIGTERM and t.step == 1


def test_a_traced_step_records_the_sum_of_its_microbatch_losses(monkeypatch, tmp_path):
    from torchtitan_runai.training import data_position, step_trace

    monkeypatch.setenv(step_trace.STEP_TRACE_ENV, str(tmp_path / "steps.jsonl"))
    monkeypatch.setenv(data_position.TRACE_ENV, str(tmp_path / "data.jsonl"))
    monkeypatch.setenv("RANK", "0")
    losses = iter([1.5, 2.25])

    def forward_backward(self, *args, **kwargs):
        return torch.tensor(next(losses), requires_grad=True)

    def train_step(self, data):  # two microbatches (gradient accumulation)
        self.forward_backward_step()
        self.forward_backward_step()
        self.step += 1

    monkeypatch.setattr(upstream.Trainer, "forward_backward_step", forward_backward)
    monkeypatch.setattr(upstream.Trainer, "train_step", train_step)
    t = bare_trainer(Events())
    t.step_trace, t.data_trace = step_trace.StepTrace(), data_position.StepRecorder()
    t.parallel_dims = SimpleNamespace(pp_enabled=False)
    t.lr_schedulers = SimpleNamespace(schedulers=[SimpleNamespace(get_last_lr=lambda: [0.5])])
    t._step_loss = None
    t.train_step(iter(()))
    line = json.loads((tmp_path / "steps.jsonl").read_text())
    assert (line["step"], float.fromhex(line["loss"])) == (1, 3.75)
    data = json.loads((tmp_path / "data.jsonl").read_text())
    assert (float.fromhex(data["loss"]), float.fromhex(data["lr"])) == (3.75, 0.5)  # the lr the step trained with


def test_the_data_loader_wait_is_charged_to_the_ledger(monkeypatch):
    events = Events()

    def batches(self, data_iterable):
        for item in data_iterable:
            events.append(("loaded", item))
            yield item

    monkeypatch.setattr(upstream.Trainer, "batch_generator", batches)
    t = bare_trainer(events)
    assert list(islice(t.batch_generator(iter("ab")), 2)) == ["a", "b"]
    assert events == [
        ("ledger.during", "data_wait"),
        ("loaded", "a"),
        ("ledger.during_end", "data_wait"),
        ("ledger.during", "data_wait"),
        ("loaded", "b"),
        ("ledger.during_end", "data_wait"),
    ]


def test_a_loaded_checkpoint_is_the_resumed_from_step():
    t = object.__new__(trainer_mod.RunaiTrainer)
    t.load_state_dict({"step": 40, "ntokens_seen": 0})
    assert t.resumed_from == 40


def test_goodput_report_writes_the_summary_and_the_scalars(tmp_path, caplog):
    clock = iter(range(1000, 2000, 10))
    ledger = Ledger(tmp_path / "ledger", clock=lambda: float(next(clock)), started_at=None)
    ledger.switch("work")
    scalars = []
    t = object.__new__(trainer_mod.RunaiTrainer)
    t.ledger, t.step = ledger, 5
    t.job_config = SimpleNamespace(job=SimpleNamespace(dump_folder=str(tmp_path)))
    t.metrics_processor = SimpleNamespace(
        logger=SimpleNamespace(log=lambda values, step: scalars.append((values, step)))
    )
    caplog.set_level(logging.DEBUG)
    t.report_goodput()
    summary = json.loads((tmp_path / "goodput.json").read_text())
    # a progress figure, named so: the launcher's line at its exit is the run's one figure
    assert [(r.levelname, r.getMessage()[:29]) for r in caplog.records] == [("INFO", "goodput so far (step 5): 0.0%")]
    caplog.clear()
    t.report_goodput(final=True)  # the last step: the same figure, at DEBUG only
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    assert len(scalars) == 2 and (tmp_path / "goodput.json").is_file()
    assert summary["goodput"] is not None and summary["seconds"]["startup"] > 0
    assert scalars and scalars[0][1] == 5 and "goodput/goodput(%)" in scalars[0][0]
    (tmp_path / "goodput.json").unlink()
    t.ledger = NullLedger()  # ranks other than 0: no report
    t.report_goodput()
    assert not (tmp_path / "goodput.json").exists() and len(scalars) == 2
