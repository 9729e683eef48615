"""One exception type for every mistake a user can fix, and the one place it is printed.

A ``UserError`` names the setting, its value, why it is wrong and how to fix it. The command-line
edges (``launch``, ``preflight``, ``manifest``, ``export``, ``stage``, ``goodput``, ``plots``) catch it
once (``cli``) and print it as a single line on stderr with exit code 2: no Python traceback reaches
``kubectl logs``.

The operating system's answers about a path the user gave (no space, a name too long, a read-only
file system, no permission, a file where a folder must be, a missing path) are the user's to fix
too: ``describe_os_error`` turns such an ``OSError`` into a ``UserError`` naming the path and the
fix, and ``cli`` prints it the same way. An ``OSError`` without a path, or with another errno (a
dropped connection, a bug), keeps its traceback.

Every deliberate exit of the launcher and of the ranks leaves through ``flush_and_exit``: the logs
and both streams flushed, then ``os._exit``.

A worker's error that must end the whole launch (a full disk during a checkpoint save) also goes to
the launcher (``report_to_launcher``, to the file ``WORKER_ERROR_ENV`` names): the launcher raises it
again as its own last line and exit 2, even when it was stopping for a SIGTERM anyway (torchrun
tells it nothing of the workers' exits then). Each attempt's workers clear the file at start
(``forget_report``), so a restarted worker group is not blamed for its predecessor's error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2
EXIT_HUNG = 142
"""A hung job: a rank's watchdog exits with it and the launcher passes it on (128 + SIGALRM: retryable
under Kubeflow's ExitCode restart policy)."""
HANG_VERDICT_ENV = "TORCHTITAN_RUNAI_HANG_VERDICT"
"""Set by the launcher for its workers (``launcher.workers``): the file where a watchdog leaves its
verdict. The ranks it SIGKILLs may be reported to torchrun before the detecting rank's own exit, so
the launcher reads the verdict from there."""
WORKER_ERROR_ENV = "TORCHTITAN_RUNAI_WORKER_ERROR"


class UserError(Exception):
    """A problem the user can fix: bad environment, bad config, missing file, bad token."""

    def __init__(self, setting: str, value: object, why: str, fix: str):
        self.setting, self.value, self.why, self.fix = setting, value, why, fix
        super().__init__(self.line())

    def line(self) -> str:
        shown = "" if self.value is None else f" = {self.value!r}"
        return f"{self.setting}{shown}: {self.why}. Fix: {self.fix}"


_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: (
        "no space left on the device",
        "free space on that volume (or grow it), or write to another one with room",
    ),
    errno.EDQUOT: (
        "the disk quota is used up",
        "free space within the quota (or raise it), or write to another volume",
    ),
    errno.ENAMETOOLONG: (
        "a file name is too long for the file system (at most 255 bytes a name, 4096 a path)",
        "use a shorter name",
    ),
    errno.EROFS: (
        "it is on a read-only file system",
        "write to a writable folder (a PVC mounted read-write, or a folder of your own): pass another path",
    ),
    errno.EACCES: (
        "permission denied",
        "use a folder this user can write (check the volume's owner and the pod's securityContext fsGroup), "
        "or pass another path",
    ),
    errno.ENOTDIR: (
        "a part of that path is a file, not a folder",
        "name a folder, or move the file that is in the way",
    ),
    errno.EISDIR: ("it is a folder where a file is needed", "name a file, not a folder"),
    errno.EEXIST: (
        "it exists and is not a folder",
        "name a folder (or a path that does not exist yet), or move the file that is in the way",
    ),
    errno.ENOENT: (
        "no such file or folder",
        "check the path (a relative path is taken from the current directory, {cwd})",
    ),
}
_OS_ERRORS[errno.EPERM] = _OS_ERRORS[errno.EACCES]


def describe_os_error(error: OSError, setting: str = "path") -> UserError | None:
    """An ``OSError`` about a path the user gave as one line (the path, what the system said, the fix);
    None when it names no path or is not one of these errnos (``_OS_ERRORS``): a bug, or a network
    error, keeps its traceback."""
    if not isinstance(error, OSError) or error.filename is None or error.errno not in _OS_ERRORS:
        return None
    why, fix = _OS_ERRORS[error.errno]
    path = os.fsdecode(error.filename) if isinstance(error.filename, (str, bytes, os.PathLike)) else error.filename
    if error.filename2 is not None:  # a rename or a link: both ends
        why = f"{why} (writing {os.fsdecode(error.filename2)})"
    with contextlib.suppress(OSError):
        fix = fix.format(cwd=os.getcwd())
    return UserError(setting, str(path), f"{why} [{errno.errorcode.get(error.errno, error.errno)}]", fix)


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Name ``path`` on an ``OSError`` raised inside that names none (a full disk found when a file is
    closed, a library's write), so that ``describe_os_error`` can name it."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            error.filename = os.fspath(path)
        raise


def exit_with(error: UserError, prog: str = "torchtitan-runai") -> NoReturn:
    print(f"{prog}: error: {error.line()}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR)


def cli(main: Callable[[list[str]], int | None], prog: str) -> NoReturn:
    """Run a command's main(argv); turn a UserError, or an OSError about a path
    (``describe_os_error``), into one line and exit 2."""
    try:
        code = main(sys.argv[1:])
    except UserError as error:
        exit_with(error, prog)
    except OSError as error:
        described = describe_os_error(error)
        if described is None:
            raise
        exit_with(described, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130)
    raise SystemExit(code or 0)


FLUSH_WAIT_S = 5.0
"""How long ``flush_and_exit``, called from a thread other than the main one, waits for the flush."""


def _flush() -> None:
    # each step on its own: a broken stream, or a write this thread's signal handler interrupted
    # (a reentrant flush raises), must not keep the others unflushed or the process alive
    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def flush_and_exit(code: int) -> NoReturn:
    """Leave the process now with ``code``: flush the logs, stdout and stderr, then ``os._exit``.

    No atexit handlers and no interpreter teardown: every record is written by then, unloading torch
    costs the pod seconds, and stock torchtitan aborts in it in ~1 of 20 runs. The launcher (at its
    end), a rank (at its end, after its preemption checkpoint, on a signal before its first step) and
    the hang watchdog all leave here, and the exit comes whatever the flush meets.

    From a thread other than the main one (the hang watchdog) the flush runs in a thread of its own
    and is waited for at most ``FLUSH_WAIT_S``: the hung main thread may hold a stream's or a log
    handler's lock for ever, and the watchdog's exit is what ends the hang. The main thread flushes
    itself (no thread is started from a signal handler).
    """
    try:
        if threading.current_thread() is threading.main_thread():
            _flush()
        else:
            flusher = threading.Thread(target=_flush, name="runai-exit-flush", daemon=True)
            flusher.start()
            flusher.join(FLUSH_WAIT_S)
    finally:
        os._exit(code)


def leave_for_launcher(variable: str, text: str) -> bool:
    """Write ``text`` whole (write, then rename) to the file the launcher named in ``variable`` (a worker's
    hang verdict, a launch-ending error); False without a launcher or when the file cannot be written:
    the worker's own line is still printed."""
    path = os.environ.get(variable)
    if not path:
        return False
    try:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return True
    except OSError:
        return False


def report_to_launcher(error: UserError) -> None:
    """Leave ``error`` for the launcher (see the module docstring); nothing without a launcher."""
    try:
        record = json.dumps({"setting": error.setting, "value": error.value, "why": error.why, "fix": error.fix})
    except TypeError:  # a value JSON cannot hold: the worker's own line is still printed
        return
    leave_for_launcher(WORKER_ERROR_ENV, record)


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
