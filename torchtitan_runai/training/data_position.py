"""The global data position: one order of training sequences for the whole job, whatever its size.

Two versions of the order share the lanes, the windows, the checkpoint keys and the loader here: a
fresh run uses ``shards-1`` (``training.data_shards``: each lane reads its own pieces of the corpus,
so each rank reads only its share); ``lanes-1``, below, is the order of runs started before it, kept
so that their checkpoints go on in it (``RunaiDataloader.load_state_dict`` picks the order the
checkpoint's position names). Batches are made ahead on a thread (``LaneLoader``).

torchtitan gives every data-parallel rank its own share of the documents, packs that share into its
own token stream and checkpoints each rank's place in it (``dataloader.dp_rank_N``). That order
depends on the number of ranks, so a job cannot continue on another node count (torchtitan refuses:
"dataloader resharding is not supported yet"). Here the order depends only on the global batch.

The order
    ``G`` is the global batch in sequences: ``training.global_batch_size``, or local batch x
    data-parallel degree when that is -1, fixed when the run starts (a resume keeps it; see
    ``checkpoint.resume``). Documents are numbered in corpus order across epochs: global document
    ``i`` is row ``i mod n`` of a map-style dataset (``local`` files, ``c4_test``), the ``i``-th
    example of a stream (``c4``, ``local`` with ``data.streaming``). There are ``G`` *lanes*: lane
    ``v`` takes documents ``v, v+G, v+2G, ...`` and packs their tokens (BOS text EOS, concatenated)
    into windows of ``seq_len + 1``, exactly as torchtitan packs a rank's share. Step ``s`` trains on
    the ``s``-th window of every lane, so the global batch of a step is the same ``G`` sequences at any
    data-parallel size, and the loss of a step is the same up to the order of float sums.

The ranks
    With ``M`` data-parallel ranks (``M`` must divide ``G``) rank ``r`` owns lanes
    ``[r*G/M, (r+1)*G/M)``; microbatch ``k`` of a step is the next ``L`` of them (local batch ``L``,
    ``A = G / (M*L)`` microbatches). A map-style rank reads only its own documents. A streaming rank
    reads the stream from the earliest document its lanes still need and keeps its lanes' documents
    (every rank reads the whole stream, tokenizes only its ``1/M``; documents of a lane that runs
    behind its neighbours wait in memory until it needs them).

The position, in the checkpoint
    ``dataloader.position``: format, ``G``, ``seq_len``, dataset (the same on every rank);
    ``dataloader.lane_<v>``: lane ``v``'s next token (document index, token offset), the windows it
    has produced (= the step) and, for streams, the stream state before a document at or before it.
    Each lane is written by the rank that owns it, once; any size reads the lanes it owns. The data
    position of step ``s`` is ``s*G`` sequences (``s*G*seq_len`` tokens) consumed by the whole job.

A checkpoint written before this (torchtitan's ``dataloader.dp_rank_N``) resumes with torchtitan's
per-rank order at its own size: ``RunaiDataloader.use_per_rank`` before loading.

``TORCHTITAN_RUNAI_DATA_TRACE=<file>`` appends one JSON line per window (rank, lane, window, first
document and offset, a hash of its tokens): the tests prove no window is repeated or skipped across a
change of size with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

from torchtitan_runai.checkpoint.resume import GLOBAL_ORDER as FORMAT
from torchtitan_runai.checkpoint.resume import PER_RANK
from torchtitan_runai.training.stream import RetryingStream
from torchtitan_runai.upstream import BaseDataLoader, logger

SHARDS = "shards-1"
"""The position's format of ``training.data_shards``' order (a fresh run's); ``FORMAT`` is ``lanes-1``."""
POSITION_KEY = "position"
TRACE_ENV = "TORCHTITAN_RUNAI_DATA_TRACE"


def lane_key(lane: int) -> str:
    return f"lane_{lane:06d}"


def lanes_of(global_batch: int, dp_degree: int, dp_rank: int) -> range:
    """The lanes data-parallel rank ``dp_rank`` of ``dp_degree`` owns (``dp_degree`` divides G)."""
    if global_batch % dp_degree:
        raise ValueError(f"data-parallel degree {dp_degree} does not divide the global batch {global_batch}")
    per = global_batch // dp_degree
    return range(dp_rank * per, (dp_rank + 1) * per)


@dataclass
class LaneState:
    """Where a lane stands: its next token is token ``offset`` of global document ``doc``."""

    doc: int
    """Global index of the document holding the lane's next token."""
    offset: int = 0
    """Tokens of that document (BOS included) already in earlier windows."""
    windows: int = 0
    """Windows the lane has produced: the steps trained."""
    snap_doc: int = 0
    """Streams: the stream state ``snap`` is the one from which the next example read is document
    ``snap_doc`` (at or before ``doc``); ``snap`` None: the start of the stream."""
    snap: Any = None


# ---------------------------------------------------------------------------------------------
# documents by global index


class EndOfData(Exception):
    """A finite order (``infinite=False``: one epoch) has no document ``i``."""


class MapDocuments:
    """Document ``i`` of a map-style dataset: row ``i mod n`` (random access, nothing to buffer)."""

    def __init__(self, dataset, text_of: Callable[[dict], str], infinite: bool = True):
        self.dataset, self.text_of, self.n, self.infinite = dataset, text_of, len(dataset), infinite

    def start(self, states: dict[int, LaneState], global_batch: int) -> None:
        pass

    def fetch(self, i: int) -> tuple[str, int, Any]:
        """(text, snap_doc, snap) of document ``i``."""
        if i >= self.n and not self.infinite:
            raise EndOfData(i)
        return self.text_of(self.dataset[i % self.n]), 0, None


class StreamDocuments:
    """Document ``i`` of a stream, for the lanes of one rank.

    Reads forward from the earliest state its lanes need; keeps documents of its own lanes that are
    still to come, drops the rest. The stream is read through ``training.stream.RetryingStream``:
    transient Hub errors (429 / 5xx / dropped connection) put it back to the state before the failed
    read and retry after a backoff, so no document is lost or read twice.
    """

    def __init__(
        self,
        dataset,
        text_of: Callable[[dict], str],
        retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 16.0,
        sleep: Callable[[float], None] | None = None,
        name: str = "",
        infinite: bool = True,
    ):
        self.infinite = infinite
        self.dataset, self.text_of, self.name = dataset, text_of, name
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.sleep = sleep or time.sleep
        self.initial = dataset.state_dict()
        self.buffer: dict[int, tuple[str, Any]] = {}
        self.stream: RetryingStream | None = None

    def start(self, states: dict[int, LaneState], global_batch: int) -> None:
        self.global_batch = global_batch
        self.needed = {lane: st.doc for lane, st in states.items()}
        first = min(states.values(), key=lambda st: st.snap_doc)
        self.dataset.load_state_dict(first.snap if first.snap is not None else self.initial)
        self.index = first.snap_doc
        self.stream = RetryingStream(
            self.dataset, self.name, self.retries, self.backoff_s, self.max_backoff_s, self.sleep
        )
        self.buffer.clear()

    def _read(self) -> tuple[dict, Any]:
        """The next example and the stream state before it."""
        looped = False
        while True:
            try:
                return self.stream.read()
            except StopIteration:
                if not self.infinite:
                    raise EndOfData(self.index) from None
                if looped:
                    raise ValueError(f"dataset {self.name} has no examples") from None
                # a new epoch: the stream again from its start; the document index goes on
                logger.warning(f"dataset {self.name} is being re-looped")
                looped = True
                self.stream.restart(self.initial)

    def fetch(self, i: int) -> tuple[str, int, Any]:
        while i not in self.buffer:
            sample, before = self._read()
            index, self.index = self.index, self.index + 1
            lane = index % self.global_batch
            if lane in self.needed and index >= self.needed[lane]:
                self.buffer[index] = (self.text_of(sample), before)
        text, before = self.buffer.pop(i)
        self.needed[i % self.global_batch] = i + self.global_batch
        return text, i, before


# ---------------------------------------------------------------------------------------------
# lanes -> windows


class GlobalOrder:
    """The windows of one rank's lanes, in lane order, one per lane per round (= per step).

    This is the ``lanes-1`` order (lane ``v``: documents ``v, v+G, ...`` of the corpus); a fresh run
    uses ``training.data_shards.ShardOrder`` (``shards-1``), which overrides ``_fetch`` / ``_stride``."""

    format = FORMAT

    def __init__(
        self,
        documents,
        tokenize: Callable[[str], list[int]],
        seq_len: int,
        global_batch: int,
        lanes: range,
        dataset_name: str = "",
        rank: int = 0,
    ):
        self.documents, self.tokenize, self.seq_len = documents, tokenize, seq_len
        self.global_batch, self.lanes, self.dataset_name, self.rank = global_batch, lanes, dataset_name, rank
        self.states = {lane: LaneState(doc=lane) for lane in lanes}
        self.tokens: dict[int, tuple[int, list[int]]] = {}  # lane -> (document, its tokens)
        self.started = False
        self.trace = bool(os.environ.get(TRACE_ENV))
        self.traced: list[dict] = []  # windows made, written by the loader when they are handed out

    def _start(self) -> None:
        if not self.started:
            self.documents.start(self.states, self.global_batch)
            self.started = True

    def _doc_tokens(self, lane: int, doc: int) -> list[int]:
        cached = self.tokens.get(lane)
        if cached is None or cached[0] != doc:
            text, snap_doc, snap = self._fetch(lane, doc)
            cached = (doc, self.tokenize(text))
            self.tokens[lane] = cached
            if snap is not None or snap_doc:
                st = self.states[lane]
                st.snap_doc, st.snap = snap_doc, snap
        return cached[1]

    def _fetch(self, lane: int, doc: int) -> tuple[str, int, Any]:
        return self.documents.fetch(doc)

    def _stride(self, lane: int) -> int:
        return self.global_batch

    def window(self, lane: int) -> list[int]:
        """Lane ``lane``'s next ``seq_len + 1`` tokens; advances its state."""
        self._start()
        st = self.states[lane]
        need = self.seq_len + 1
        first = (st.doc, st.offset)
        out: list[int] = []
        doc, offset = st.doc, st.offset
        while len(out) < need:
            tokens = self._doc_tokens(lane, doc)
            take = tokens[offset : offset + need - len(out)]
            out.extend(take)
            offset += len(take)
            if offset >= len(tokens):
                doc, offset = doc + self._stride(lane), 0
        st.doc, st.offset = doc, offset
        st.windows += 1
        if self.trace:
            digest = hashlib.sha1(json.dumps(out).encode()).hexdigest()[:16]
            self.traced.append(
                {
                    "rank": self.rank,
                    "lane": lane,
                    "window": st.windows - 1,
                    "doc": first[0],
                    "offset": first[1],
                    "sha": digest,
                }
            )
        return out

    def rounds(self) -> Iterator[list[int]]:
        while True:
            for lane in self.lanes:
                try:
                    window = self.window(lane)
                except EndOfData:
                    return
                yield window

    # -- checkpoint ---------------------------------------------------------------------------

    def position(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "global_batch": self.global_batch,
            "seq_len": self.seq_len,
            "dataset": self.dataset_name,
        }

    def state_dict(self) -> dict[str, bytes]:
        out = {POSITION_KEY: json.dumps(self.position(), sort_keys=True).encode()}
        for lane, st in self.states.items():
            out[lane_key(lane)] = json.dumps(asdict(st)).encode()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = json.loads(_text(state[POSITION_KEY]))
        mine = self.position()
        for key in mine:
            if key == "dataset":
                continue
            if saved.get(key) != mine[key]:
                raise ValueError(f"data position {key} {saved.get(key)!r} in the checkpoint, {mine[key]!r} here")
        states = {lane: LaneState(**json.loads(_text(state[lane_key(lane)]))) for lane in self.lanes}
        if len({st.windows for st in states.values()}) > 1:
            raise ValueError(
                f"lanes of one checkpoint at different steps: {sorted({st.windows for st in states.values()})}"
            )
        self.states = states
        self.tokens.clear()
        self.started = False

    @property
    def windows(self) -> int:
        return next(iter(self.states.values())).windows


class StepRecorder:
    """With TORCHTITAN_RUNAI_DATA_TRACE: every rank's own loss share and learning rate per step.

    The share is torchtitan's ``local loss sum / global valid tokens``: the shares of a step sum
    to its logged loss, at any data-parallel size."""

    def __init__(self):
        self.path = os.environ.get(TRACE_ENV)
        self.enabled = bool(self.path)
        self.rank = int(os.environ.get("RANK", "0"))

    def record(self, step: int, loss: float, lr: float) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(
                    json.dumps({"rank": self.rank, "step": step, "loss": float(loss).hex(), "lr": float(lr).hex()})
                    + "\n"
                )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


# ---------------------------------------------------------------------------------------------
# the dataloader torchtitan's Trainer iterates and checkpoints


class LaneLoader:
    """Batches of ``local_batch`` windows (torchtitan's ``({"input": x}, labels)``), lanes in order.

    Made ahead of the training step on a background thread (reading, decoding, tokenizing), at most
    ``prefetch`` batches ahead; each batch carries the order's state after it (the lanes' small JSON
    records, once per batch), and ``state_dict`` is the state after the last batch handed out, so a
    checkpoint never counts a batch made but not trained. A new ``iter`` (or ``load_state_dict``)
    stops the thread and goes on from the last batch handed out.
    """

    def __init__(self, order: GlobalOrder, local_batch: int, prefetch: int = 4):
        self.order, self.local_batch, self.prefetch = order, local_batch, prefetch
        self.handed: dict[str, Any] | None = None  # the state after the last batch handed out
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self.trace_path = os.environ.get(TRACE_ENV)

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            rounds = self.order.rounds()
            while not stop.is_set():
                rows = [window for _, window in zip(range(self.local_batch), rounds)]
                if len(rows) < self.local_batch:
                    put(_END)  # a finite order's last, partial batch is dropped, as torchtitan's is
                    return
                rows = torch.tensor(rows, dtype=torch.long)
                batch = ({"input": rows[:, :-1].contiguous()}, rows[:, 1:].contiguous())
                traced, self.order.traced = self.order.traced, []
                if not put((batch, self.order.state_dict(), traced)):
                    return
        except BaseException as error:  # handed to the training thread, raised there
            put(_Failed(error))

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __iter__(self):
        self._halt()
        if self.handed is not None:
            self.order.load_state_dict(self.handed)  # what the thread made beyond it is made again
        self.order.traced = []
        self._stop = stop = threading.Event()
        self._queue = out = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(out, stop), name="data", daemon=True)
        self._thread.start()
        while True:
            item = out.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            batch, self.handed, traced = item
            if traced and self.trace_path:
                with open(self.trace_path, "a") as f:
                    f.write("".join(json.dumps(t) + "\n" for t in traced))
            yield batch

    def queued(self) -> int:
        """Batches made and not yet handed out."""
        return self._queue.qsize() if self._queue is not None else 0

    def state_dict(self) -> dict[str, Any]:
        return self.handed if self.handed is not None else self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._halt()
            self.order.load_state_dict(state)
            self.handed = None


_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def saved_order(state: dict[str, Any]) -> str | None:
    """The order (``lanes-1``, ``shards-1``) a global data position was written with; None: none."""
    position = state.get(POSITION_KEY) if state else None
    if position is None:
        return None
    try:
        return json.loads(_text(position)).get("format")
    except (ValueError, AttributeError):
        return None


class RunaiDataloader(BaseDataLoader):
    """Global lanes, unless the checkpoint it resumes from has torchtitan's per-rank state.

    The loader is built on first use, so that the checkpoint manager can pick the format
    (``use_per_rank``) before anything is read; with ``peers`` (``training.data_peers``) only the
    reader of a data-parallel rank's peers builds one.
    """

    def __init__(
        self,
        build_lanes: Callable[[], Any],
        build_per_rank: Callable[[], Any],
        build_shards: Callable[[], Any] | None = None,
        peers: Any = None,
    ):
        self.peers = peers
        """``training.data_peers.Peers``: this rank reads and hands its batches to its pipeline /
        context / tensor-parallel peers, or (``peers.reads`` false) receives them and builds nothing."""
        self._received: dict[str, Any] = {}  # a peer's: the reader's state after the last batch
        self._build = {FORMAT: build_lanes, PER_RANK: build_per_rank}
        self._orders = {FORMAT: build_lanes}
        self.order = FORMAT
        if build_shards is not None:
            self._orders[SHARDS] = build_shards
            self.order = SHARDS  # a fresh run's global order
        self.format = FORMAT
        """The position's kind in the checkpoint marker (``checkpoint.resume``): the global order
        (``lanes-1``, for both of its versions ``self.order``), or ``per-rank``."""
        self._impl = None

    @property
    def impl(self):
        if self._impl is None:
            self._impl = self._orders[self.order]() if self.format == FORMAT else self._build[self.format]()
        return self._impl

    def use_per_rank(self) -> None:
        """torchtitan's per-rank order (``data.order = "per-rank"``, or an old checkpoint)."""
        self.format, self._impl = PER_RANK, None

    @property
    def receives(self) -> bool:
        """A peer that reads nothing: its batches come from its data-parallel rank's reader."""
        return self.peers is not None and not self.peers.reads

    def _keep(self, state: dict[str, Any]) -> None:
        self._received = state

    def __iter__(self):
        if self.peers is None:
            return iter(self.impl)
        if self.receives:
            return self.peers.receive(self._keep)
        impl = self.impl
        return self.peers.send(iter(impl), impl.state_dict)

    def state_dict(self) -> dict[str, Any]:
        if self.receives:
            return self._received
        return self.impl.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.receives:
            self._received = state_dict or {}
            return
        saved = saved_order(state_dict) if self.format == FORMAT else None
        if saved in self._orders and saved != self.order:
            # a checkpoint of the other global order (lanes-1: written before shards-1) goes on in its own
            # order; both store the same keys (the position and one per lane), so it loaded as is
            self.order, self._impl = saved, None
        self.impl.load_state_dict(state_dict)
