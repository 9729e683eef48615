"""A slow checkpoint volume for the preemption tests (on PYTHONPATH only when a test asks for it).

With ``TORCHTITAN_RUNAI_TEST_WRITE_BPS=<bytes per second>`` set, DCP's checkpoint saving process
(a ``multiprocessing`` child of a trainer rank: the process that writes async uploads) writes at
most that many bytes per second, whatever its writer-thread count: after each item DCP writes, the
writing thread waits until a process-wide budget allows it, like a volume with that bandwidth.
Synchronous saves in the trainer itself (preemption, final) run at full speed.

How this differs from a real slow volume: the bytes reach the page cache at once and the waiting
happens after each item rather than inside write()/fsync(). What the trainer sees is the same: the
upload stays in flight for bytes / rate seconds, ``.metadata`` is still written last (by DCP's
coordinator, after every rank's items), and a kill -9 in the meantime leaves a step folder without
``.metadata``.
"""

import os

_RATE = float(os.environ.get("TORCHTITAN_RUNAI_TEST_WRITE_BPS", "0") or 0)

if _RATE > 0:
    import multiprocessing
    import threading
    import time

    import torch.distributed.checkpoint.filesystem as _fs

    _original = _fs._write_item
    _lock = threading.Lock()
    _next_free = [0.0]

    def _throttled_write_item(*args, **kwargs):
        result = _original(*args, **kwargs)
        if multiprocessing.parent_process() is not None:  # DCP's saving process only
            nbytes = result.storage_data.length
            with _lock:
                start = max(_next_free[0], time.monotonic())
                _next_free[0] = start + nbytes / _RATE
                until = _next_free[0]
            time.sleep(max(0.0, until - time.monotonic()))
        return result

    _fs._write_item = _throttled_write_item
