"""A ``datasets`` stream read forward through transient Hub errors: the one retrying reader.

Both data orders read streams through ``RetryingStream``: torchtitan's per-rank order
(``training.data.ResilientTextDataset``) and the global order (``training.data_position.StreamDocuments``).

On a 429 / 5xx / dropped connection (``hub.is_transient``) the stream is put back to the state it had
before the failed read (datasets' checkpointable stream state) and reopened after a backoff, so no
example is lost or read twice. The backoff starts at ``data.backoff_s`` and doubles up to
``data.max_backoff_s``; after ``data.retries`` failures without an example read in between, or at
once on any other error, the error is raised. Each retry logs one warning::

    dataset c4: ConnectionError: <its first line, tokens redacted>; resuming the stream in 2.0s (2/5)

The end of the stream is ``StopIteration`` from ``read``: what follows (the end of an epoch, a new
one) is the caller's.

``snapshot_every``: the stream's state is taken every this many examples (1: before each, the state
``read`` returns); after a failure the stream goes back to the last one and drops the examples
already read since, so a large value spares a ``state_dict`` per example at the price of re-reading
up to that many after a dropped connection (``read`` then returns None for the state).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from torchtitan_runai.hub import is_transient, redact
from torchtitan_runai.upstream import logger


class RetryingStream:
    """Examples of ``dataset`` (a ``datasets`` stream, or anything with its ``state_dict`` /
    ``load_state_dict`` / ``__iter__``) from its current state on, retried as the module says."""

    def __init__(
        self,
        dataset,
        name: str,
        retries: int,
        backoff_s: float,
        max_backoff_s: float,
        sleep: Callable[[float], None] = time.sleep,
        snapshot_every: int = 1,
    ):
        self.dataset, self.name = dataset, name
        self.snapshot_every = max(1, snapshot_every)
        self.since = 0  # examples read since self.state
        self.replay = 0  # examples to read again and drop after going back to self.state
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.sleep = sleep
        # counted from the last example read (a restart does not reset them); a give-up resets them
        self.failures, self.wait = 0, backoff_s
        self.state = dataset.state_dict()
        self.iterator = iter(dataset)

    def restart(self, state: Any) -> None:
        """Read on from ``state`` (one of the dataset's ``state_dict``s)."""
        self.dataset.load_state_dict(state)
        self.state = self.dataset.state_dict()
        self.since = self.replay = 0
        self.iterator = iter(self.dataset)

    def read(self) -> tuple[dict, Any]:
        """The next example and the stream state before it; StopIteration at the end of the stream."""
        while True:
            before = self.state
            try:
                sample = next(self.iterator)
            except StopIteration:  # the end of the stream is the caller's, not an error to retry
                raise
            except Exception as error:
                if self.failures >= self.retries or not is_transient(error):
                    self.failures, self.wait = 0, self.backoff_s
                    raise
                self.failures += 1
                logger.warning(
                    f"dataset {self.name}: {type(error).__name__}: "
                    f"{redact(str(error)).splitlines()[0] if str(error) else ''}; "
                    f"resuming the stream in {self.wait:.1f}s ({self.failures}/{self.retries})"
                )
                self.sleep(self.wait)
                self.wait = min(self.max_backoff_s, self.wait * 2)
                self.dataset.load_state_dict(self.state)
                self.iterator = iter(self.dataset)
                self.replay, self.since = self.replay + self.since, 0
                continue
            self.failures, self.wait = 0, self.backoff_s
            self.since += 1
            if self.replay:
                self.replay -= 1
                continue
            if self.since >= self.snapshot_every:
                self.state, self.since = self.dataset.state_dict(), 0
                return sample, (before if self.snapshot_every == 1 else None)
            return sample, None

    def __iter__(self) -> Iterator[dict]:
        """The examples to the end of the stream."""
        while True:
            try:
                sample, _ = self.read()
            except StopIteration:
                return
            yield sample
