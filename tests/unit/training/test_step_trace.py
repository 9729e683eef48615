"""training.step_trace: the exact per-step record is off unless its variable names a file."""

from torchtitan_runai.training.step_trace import StepTrace


def test_step_trace_is_off_without_its_variable(monkeypatch):
    monkeypatch.delenv("TORCHTITAN_RUNAI_STEP_TRACE", raising=False)
    assert not StepTrace().enabled
