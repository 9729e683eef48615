"""Exact per-step record for tests and debugging.

With ``TORCHTITAN_RUNAI_STEP_TRACE=<file>``, rank 0 appends each step's exact local loss
(``float.hex``) and the restart count: how the tests compare runs bit for bit.
"""

from __future__ import annotations

import json
import os

STEP_TRACE_ENV = "TORCHTITAN_RUNAI_STEP_TRACE"


class StepTrace:
    def __init__(self):
        self.path = os.environ.get(STEP_TRACE_ENV)
        self.restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        # Only rank 0 records; elsewhere the loss is never read back (no per-step host sync).
        self.enabled = bool(self.path) and int(os.environ.get("RANK", "0")) == 0

    def record(self, step: int, loss) -> None:
        if not self.enabled:
            return
        value = float(loss)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "loss": value.hex(), "restart": self.restart}) + "\n")
