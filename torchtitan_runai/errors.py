"""One exception type for every mistake a user can fix, and the one place it is printed.

A ``UserError`` names the setting, its value, why it is wrong and how to fix it. The command-line
edges (``launch``, ``preflight``, ``manifest``, ``export``, ``stage``) catch it once and print it as a
single line on stderr with exit code 2: no Python traceback reaches ``kubectl logs``.

A worker's error that must end the whole launch (a full disk during a checkpoint save) also goes to
the launcher (``report_to_launcher``, to the file ``WORKER_ERROR_ENV`` names): the launcher raises it
again as its own last line and exit 2, even when it was stopping for a SIGTERM anyway (torchrun
tells it nothing of the workers' exits then). Each attempt's workers clear the file at start
(``forget_report``), so a restarted worker group is not blamed for its predecessor's error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2
EXIT_HUNG = 142
"""A hung job: a rank's watchdog exits with it and the launcher passes it on (128 + SIGALRM: retryable
under Kubeflow's ExitCode restart policy)."""
HANG_VERDICT_ENV = "TORCHTITAN_RUNAI_HANG_VERDICT"
"""Set by the launcher for its workers: the file where a watchdog leaves its verdict. The ranks it
SIGKILLs may be reported to torchrun before the detecting rank's own exit, so the launcher reads the
verdict from there."""
WORKER_ERROR_ENV = "TORCHTITAN_RUNAI_WORKER_ERROR"


class UserError(Exception):
    """A problem the user can fix: bad environment, bad config, missing file, bad token."""

    def __init__(self, setting: str, value: object, why: str, fix: str):
        self.setting, self.value, self.why, self.fix = setting, value, why, fix
        super().__init__(self.line())

    def line(self) -> str:
        shown = "" if self.value is None else f" = {self.value!r}"
        return f"{self.setting}{shown}: {self.why}. Fix: {self.fix}"


def report_to_launcher(error: UserError) -> None:
    """Leave ``error`` for the launcher (see the module docstring); nothing without a launcher."""
    path = os.environ.get(WORKER_ERROR_ENV)
    if not path:
        return
    try:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"setting": error.setting, "value": error.value, "why": error.why, "fix": error.fix}, f)
        os.replace(tmp, path)
    except (OSError, TypeError):  # the worker's own line is still printed
        pass


def forget_report() -> None:
    path = os.environ.get(WORKER_ERROR_ENV)
    if path:
        Path(path).unlink(missing_ok=True)


def reported(path: str | os.PathLike) -> UserError | None:
    """The error a worker left at ``path``, if any."""
    try:
        data = json.loads(Path(path).read_text())
        return UserError(data["setting"], data["value"], data["why"], data["fix"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def exit_with(error: UserError, prog: str = "torchtitan-runai") -> NoReturn:
    print(f"{prog}: error: {error.line()}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def cli(main: Callable[[list[str]], int | None], prog: str) -> NoReturn:
    """Run a command's main(argv); turn a UserError into one line and exit 2."""
    try:
        code = main(sys.argv[1:])
    except UserError as error:
        exit_with(error, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130)
    raise SystemExit(code or 0)
