"""torchtitan_runai.training.stream: the one retrying reader both data orders read streams through."""

from __future__ import annotations

import logging

import pytest

from torchtitan_runai.training import stream as stream_mod


class Flaky:
    """A stream with datasets' state API whose reads fail at chosen positions (each failure once)."""

    def __init__(self, n: int, failures: list[tuple[int, Exception]]):
        self.pos, self.n, self.failures = 0, n, list(failures)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]

    def __iter__(self):
        while True:
            if self.failures and self.failures[0][0] == self.pos:
                raise self.failures.pop(0)[1]
            if self.pos >= self.n:
                return
            self.pos += 1
            yield {"i": self.pos - 1}


def reader(ds, waits, **kw):
    return stream_mod.RetryingStream(
        ds, "c4", kw.get("retries", 2), kw.get("backoff_s", 1.0), kw.get("max_backoff_s", 3.0), waits.append
    )


def test_a_failed_read_resumes_from_the_state_before_it_and_logs_one_line(caplog):
    waits = []
    ds = Flaky(5, [(2, ConnectionError("Connection reset by peer\nmore")), (2, ConnectionError("again"))])
    with caplog.at_level(logging.WARNING):
        got = list(reader(ds, waits))
    assert [s["i"] for s in got] == [0, 1, 2, 3, 4] and waits == [1.0, 2.0]
    assert "dataset c4: ConnectionError: Connection reset by peer; resuming the stream in 1.0s (1/2)" in caplog.text


def test_read_returns_the_state_before_each_example():
    r = reader(Flaky(3, [(1, ConnectionError("reset"))]), [])
    assert [r.read() for _ in range(3)] == [({"i": 0}, {"pos": 0}), ({"i": 1}, {"pos": 1}), ({"i": 2}, {"pos": 2})]
    with pytest.raises(StopIteration):
        r.read()


def test_the_count_runs_from_the_last_example_across_a_restart_and_a_give_up_resets_it():
    waits = []
    r = reader(Flaky(0, [(0, ConnectionError("a"))]), waits, retries=2, backoff_s=1, max_backoff_s=8)
    with pytest.raises(StopIteration):
        r.read()  # one failure, then the end of the stream
    r.dataset.failures = [(0, ConnectionError("b")), (0, ConnectionError("c"))]
    r.restart({"pos": 0})  # a new epoch: the count and the backoff go on
    with pytest.raises(ConnectionError, match="c"):
        r.read()
    assert waits == [1, 2]
    r.dataset.failures = [(0, ConnectionError("d"))]
    r.restart({"pos": 0})
    with pytest.raises(StopIteration):
        r.read()  # counted afresh after the give-up
    assert waits == [1, 2, 1]


def test_other_errors_are_not_retried():
    waits = []
    with pytest.raises(ValueError):
        reader(Flaky(3, [(0, ValueError("bad row"))]), waits).read()
    assert waits == []


class Counted(Flaky):
    """Flaky, counting its state_dict calls."""

    snapshots = 0

    def state_dict(self):
        self.snapshots += 1
        return super().state_dict()


def test_sparse_snapshots_go_back_to_the_last_one_and_drop_what_was_read_since():
    waits = []
    ds = Counted(40, [(9, ConnectionError("reset")), (11, ConnectionError("reset")), (37, ConnectionError("x"))])
    r = stream_mod.RetryingStream(ds, "c4", 3, 1.0, 4.0, waits.append, snapshot_every=8)
    assert [s["i"] for s in r] == list(range(40))  # none lost, none twice
    assert waits == [1.0, 1.0, 1.0]
    assert ds.snapshots <= 1 + 40 // 8  # not one per example
