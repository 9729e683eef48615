"""The sharded global order (``shards-1``): every rank reads only the part of the corpus it trains on.

The global order of ``training.data_position`` (``lanes-1``) gives lane ``v`` the documents ``v, v+G,
v+2G, ...`` of the corpus: every lane draws from every shard, so every rank read the whole stream and
kept ``1/M`` of it. Here the corpus is cut into *pieces* and every piece belongs to the lanes of one
*source*, so a rank opens only its own sources' pieces, and the whole job reads each consumed byte
about once, at any data-parallel size.

Pieces (``P`` of them; a function of the files and of ``G`` only, never of the node count)
    - JSON-lines files, local (``data.streaming``): a ``.gz`` file is one piece (a gzip stream is read
      from its start); a plain file is cut into line-aligned byte ranges when there are fewer files
      than lanes (a range holds the lines that *start* in it; at least ``MIN_RANGE_BYTES`` each).
      ``LineFiles``.
    - any other ``datasets`` stream (``c4`` from the Hub: its 1,024 ``.json.gz`` shards; streamed
      parquet / arrow): the stream's own shards, ``IterableDataset.shard(n_shards, p)``.
      ``StreamShards``.
    - map-style data (``c4_test``, local files without ``data.streaming``): ``min(rows, G)`` blocks of
      consecutive rows. ``MapRows``.

Sources and lanes (``G`` lanes, ``Q = min(P, G)`` sources)
    Lane ``v`` reads source ``q = v*Q // G``; the lanes of source ``q`` are consecutive. Source ``q``
    is the concatenation of pieces ``q, q+Q, q+2Q, ...`` (looped for more epochs: each source loops on
    its own). Document ``j`` of source ``q`` goes to its ``(j mod k)``-th lane (``k`` lanes share it;
    ``k = 1`` when ``P >= G``). A lane packs its documents into windows of ``seq_len + 1`` tokens as in
    ``lanes-1``, and step ``s`` trains on every lane's ``s``-th window: the global batch of a step is
    the same at any data-parallel size.

What a rank reads
    Rank ``r`` of ``M`` owns lanes ``[rG/M, (r+1)G/M)`` and opens only their sources' pieces, from the
    earliest position its lanes still need. A source whose lanes fall on two ranks (``Q`` not a
    multiple of ``M``, e.g. 3 gzipped files at DP 4) is read by both: stage such a corpus as more
    shards (or uncompressed) when the job has more data-parallel ranks than shards.

The position
    Lane state (``data_position.LaneState``): ``doc`` = the index ``j`` in its source of the document
    holding its next token, ``offset``, ``windows``, and ``snap_doc`` / ``snap = [c, pos]``: reading
    the source's ``c``-th piece (counted across epochs) from ``pos`` (a line's byte offset, a row, a
    document count into a stream shard; None: its start) gives document ``snap_doc``. Cheap integers,
    taken per document read, never a ``datasets`` ``state_dict``. The position key records
    ``shards-1``, ``G``, ``seq_len``, the dataset and ``P``: a checkpoint of another piece count (the
    corpus changed) is refused.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Callable, Iterator

from torchtitan_runai.errors import UserError
from torchtitan_runai.training.data_position import POSITION_KEY, SHARDS, EndOfData, GlobalOrder, LaneState, _text
from torchtitan_runai.training.stream import RetryingStream
from torchtitan_runai.upstream import logger

FORMAT = SHARDS
MIN_RANGE_BYTES = 1 << 16
"""A plain file is cut into ranges of at least this many bytes (a range shorter than a line is empty)."""
STREAM_SNAPSHOT_EVERY = 1024
"""A stream shard's retry point (``RetryingStream``) is refreshed every this many documents."""


def sources_of(pieces: int, global_batch: int) -> int:
    return min(pieces, global_batch)


def source_of(lane: int, sources: int, global_batch: int) -> int:
    return lane * sources // global_batch


def lanes_of_source(source: int, sources: int, global_batch: int) -> range:
    return range(-(-source * global_batch // sources), -(-(source + 1) * global_batch // sources))


# ---------------------------------------------------------------------------------------------
# pieces


class LineFiles:
    """JSON-lines files (``.gz`` or not): gzipped files whole, plain ones in line-aligned byte ranges."""

    def __init__(self, files: list[str], text_of: Callable[[dict], str], global_batch: int):
        self.text_of = text_of
        sizes = [os.path.getsize(f) for f in files]
        plain = sum(s for f, s in zip(files, sizes) if not f.endswith(".gz"))
        self.pieces: list[tuple[str, int, int | None]] = []
        for file, size in zip(files, sizes):
            if file.endswith(".gz"):
                self.pieces.append((file, 0, None))
                continue
            cuts = 1
            if len(files) < global_batch and plain:
                cuts = max(1, min(-(-global_batch * size // plain), size // MIN_RANGE_BYTES))
            bounds = [size * i // cuts for i in range(cuts + 1)]
            self.pieces += [(file, bounds[i], bounds[i + 1]) for i in range(cuts)]
        self.count = len(self.pieces)

    def read(self, piece: int, pos: int | None) -> Iterator[tuple[int, str]]:
        file, start, end = self.pieces[piece]
        opener = gzip.open if end is None else open
        with opener(file, "rb") as f:
            if pos is not None:
                f.seek(pos)
            elif start > 0:
                f.seek(start - 1)
                f.readline()  # the rest of a line begun before the range is the previous range's
            while True:
                at = f.tell()
                if end is not None and at >= end:
                    return
                line = f.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise ValueError(f"{file}: the line at byte {at} is not JSON ({error})") from None
                yield at, self.text_of(record)


class StreamShards:
    """The shards of a ``datasets`` stream (``n_shards``), each read through ``RetryingStream``."""

    def __init__(self, dataset, text_of, name: str = "", retries=5, backoff_s=1.0, max_backoff_s=16.0, sleep=None):
        self.dataset, self.text_of, self.name = dataset, text_of, name
        self.retry = (retries, backoff_s, max_backoff_s) + ((sleep,) if sleep else ())
        self.count = dataset.n_shards

    def read(self, piece: int, pos: int | None) -> Iterator[tuple[int, str]]:
        shard = self.dataset if self.count == 1 else self.dataset.shard(self.count, piece, contiguous=True)
        stream = RetryingStream(shard, self.name, *self.retry, snapshot_every=STREAM_SNAPSHOT_EVERY)
        skip = pos or 0  # a resume inside a stream shard reads its first documents again
        for n, sample in enumerate(stream):
            if n >= skip:
                yield n, self.text_of(sample)


class MapRows:
    """A map-style dataset in ``min(rows, G)`` blocks of consecutive rows."""

    def __init__(self, dataset, text_of, global_batch: int):
        self.dataset, self.text_of, self.rows = dataset, text_of, len(dataset)
        self.count = max(1, min(self.rows, global_batch))

    def read(self, piece: int, pos: int | None) -> Iterator[tuple[int, str]]:
        lo, hi = self.rows * piece // self.count, self.rows * (piece + 1) // self.count
        for row in range(lo if pos is None else pos, hi):
            yield row, self.text_of(self.dataset[row])


# ---------------------------------------------------------------------------------------------
# one source, for the lanes of it that one rank owns


class SourceReader:
    """Documents of source ``q`` for this rank's lanes of it; others' documents are skipped."""

    def __init__(self, pieces, source: int, sources: int, global_batch: int, infinite: bool, name: str = ""):
        self.pieces, self.source, self.infinite, self.name = pieces, source, infinite, name
        self.piece_ids = list(range(source, pieces.count, sources))
        self.lanes = lanes_of_source(source, sources, global_batch)
        self.buffer: dict[int, tuple[str, int, list]] = {}

    def start(self, states: dict[int, LaneState]) -> None:
        first = min(states.values(), key=lambda st: st.snap_doc)
        self.j = first.snap_doc
        self.c, self.pos = first.snap if first.snap is not None else (0, None)
        self.needed = {lane: st.doc for lane, st in states.items()}
        self.iterator: Iterator[tuple[int, str]] | None = None
        self.cycle_j = self.j if self.c % len(self.piece_ids) == 0 and self.pos is None else None
        self.buffer.clear()

    def _next(self) -> tuple[str, list]:
        n = len(self.piece_ids)
        while True:
            if self.iterator is None:
                self.iterator = self.pieces.read(self.piece_ids[self.c % n], self.pos)
            try:
                at, text = next(self.iterator)
            except StopIteration:
                self.c, self.pos, self.iterator = self.c + 1, None, None
                if self.c % n == 0:
                    if not self.infinite:
                        raise EndOfData(self.j) from None
                    if self.cycle_j == self.j:
                        raise ValueError(f"dataset {self.name}: source {self.source} has no examples") from None
                    self.cycle_j = self.j
                    logger.warning(f"dataset {self.name}: source {self.source} is being re-looped")
                continue
            return text, [self.c, at]

    def fetch(self, lane: int, doc: int) -> tuple[str, int, list]:
        k = len(self.lanes)
        while doc not in self.buffer:
            text, snap = self._next()
            j, self.j = self.j, self.j + 1
            owner = self.lanes[j % k]
            if owner in self.needed and j >= self.needed[owner]:
                self.buffer[j] = (text, j, snap)
        text, j, snap = self.buffer.pop(doc)
        self.needed[lane] = doc + k
        return text, j, snap


# ---------------------------------------------------------------------------------------------
# the order


class ShardOrder(GlobalOrder):
    """``GlobalOrder``'s windows and checkpoint over sources of pieces (the module docstring)."""

    format = FORMAT

    def __init__(
        self,
        pieces,
        tokenize: Callable[[str], list[int]],
        seq_len: int,
        global_batch: int,
        lanes: range,
        dataset_name: str = "",
        rank: int = 0,
        infinite: bool = True,
    ):
        super().__init__(None, tokenize, seq_len, global_batch, lanes, dataset_name, rank)
        self.pieces = pieces
        self.sources = sources_of(pieces.count, global_batch)
        if self.sources < 1:
            raise ValueError(f"dataset {dataset_name} has no data")
        self.readers: dict[int, SourceReader] = {}
        for lane in lanes:
            q = source_of(lane, self.sources, global_batch)
            if q not in self.readers:
                self.readers[q] = SourceReader(pieces, q, self.sources, global_batch, infinite, dataset_name)
        self.states = {lane: LaneState(doc=self._reader(lane).lanes.index(lane)) for lane in lanes}

    def _reader(self, lane: int) -> SourceReader:
        return self.readers[source_of(lane, self.sources, self.global_batch)]

    def _start(self) -> None:
        if not self.started:
            for q, reader in self.readers.items():
                reader.start({lane: st for lane, st in self.states.items() if self._reader(lane) is reader})
            self.started = True

    def _fetch(self, lane: int, doc: int) -> tuple[str, int, Any]:
        return self._reader(lane).fetch(lane, doc)

    def _stride(self, lane: int) -> int:
        return len(self._reader(lane).lanes)

    def position(self) -> dict[str, Any]:
        return {**super().position(), "pieces": self.pieces.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = json.loads(_text(state[POSITION_KEY]))
        if saved.get("format") == self.format and saved.get("pieces") != self.pieces.count:
            raise UserError(
                "training.dataset_path",
                self.dataset_name,
                f"the checkpoint's data position is over {saved.get('pieces')} pieces of the corpus, this "
                f"job's corpus makes {self.pieces.count} (its files, data.streaming or data.format changed)",
                "resume with the files and [data] settings the checkpoint was written with, or start a new "
                "run in a new folder",
            )
        super().load_state_dict(state)

    def read_set(self) -> list[int]:
        """The pieces this rank may open (its sources' pieces)."""
        return sorted(p for reader in self.readers.values() for p in reader.piece_ids)
