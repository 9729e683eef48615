"""The sharded global order (``shards-1``): each rank opens only its sources' pieces, the order is the
same at any data-parallel size, a resume (mid-piece, at another size) continues it exactly, batches
are made ahead on a thread, and an old ``lanes-1`` position goes on in its own order."""

from __future__ import annotations

import gzip
import json

import pytest
from test_data_position import TEXTS, checkpoint, step, text_of, tokenize

from torchtitan_runai.training import data_position as dp
from torchtitan_runai.training import data_shards as ds

G = 8


def write_jsonl(path, texts, gz=False):
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def corpus(tmp_path, kind: str):
    """Pieces of one kind over TEXTS x 4 (240 documents)."""
    texts = [f"{t} copy {c}" for c in range(4) for t in TEXTS]
    if kind == "gz-shards":  # 12 shards, more than G: every lane its own shards
        files = [write_jsonl(tmp_path / f"s{i:02d}.jsonl.gz", texts[i::12], gz=True) for i in range(12)]
        return ds.LineFiles(files, text_of, G)
    if kind == "few-gz":  # 3 shards for 8 lanes: lanes share a shard
        files = [write_jsonl(tmp_path / f"s{i}.jsonl.gz", texts[i::3], gz=True) for i in range(3)]
        return ds.LineFiles(files, text_of, G)
    if kind == "one-big-file":  # one plain file: line-aligned byte ranges
        return ds.LineFiles([write_jsonl(tmp_path / "all.jsonl", texts)], text_of, G)
    if kind == "map":
        from datasets import Dataset

        return ds.MapRows(Dataset.from_dict({"text": texts}), text_of, G)
    if kind == "stream":
        from datasets import Dataset

        return ds.StreamShards(Dataset.from_dict({"text": texts}).to_iterable_dataset(num_shards=5), text_of)
    raise AssertionError(kind)


KINDS = ["gz-shards", "few-gz", "one-big-file", "map", "stream"]


@pytest.fixture(autouse=True)
def small_ranges(monkeypatch):
    monkeypatch.setattr(ds, "MIN_RANGE_BYTES", 256)


def ranks(pieces, dp_degree: int, seq_len: int = 8, infinite: bool = True) -> list[ds.ShardOrder]:
    return [
        ds.ShardOrder(pieces, tokenize, seq_len, G, dp.lanes_of(G, dp_degree, r), rank=r, infinite=infinite)
        for r in range(dp_degree)
    ]


class Recorder:
    """Pieces that record which pieces were opened, and from where."""

    def __init__(self, pieces):
        self.pieces, self.count, self.opened = pieces, pieces.count, []

    def read(self, piece, pos):
        self.opened.append((piece, pos))
        return self.pieces.read(piece, pos)


def test_sources_split_the_lanes_into_consecutive_runs():
    assert [list(ds.lanes_of_source(q, 3, 8)) for q in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert all(ds.source_of(v, 3, 8) == q for q in range(3) for v in ds.lanes_of_source(q, 3, 8))
    assert [list(ds.lanes_of_source(q, 8, 8)) for q in range(8)] == [[v] for v in range(8)]


def test_a_plain_file_is_cut_at_line_starts_and_every_line_is_read_once(tmp_path):
    texts = [f"line {i} " + "x" * (i * 7 % 50) for i in range(300)]
    pieces = ds.LineFiles([write_jsonl(tmp_path / "a.jsonl", texts)], text_of, G)
    assert pieces.count == G
    read = [text for p in range(pieces.count) for _, text in pieces.read(p, None)]
    assert read == texts


@pytest.mark.parametrize("kind", KINDS)
def test_the_order_does_not_depend_on_the_size(tmp_path, kind):
    pieces = corpus(tmp_path, kind)
    orders = {m: ranks(pieces, m) for m in (1, 2, 8)}
    runs = {m: [step(o) for _ in range(30)] for m, o in orders.items()}  # past an epoch of every source
    assert runs[1] == runs[2] == runs[8]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m", [(1, 4), (4, 2), (8, 1), (2, 8)])
def test_resume_at_another_size_continues_the_uninterrupted_order(tmp_path, kind, n, m):
    pieces = corpus(tmp_path, kind)
    reference = ranks(pieces, 1)
    expected = [step(reference) for _ in range(30)]
    before = ranks(pieces, n)
    got = [step(before) for _ in range(13)]
    after = ranks(pieces, m)
    for o in after:
        o.load_state_dict(checkpoint(before))
    got += [step(after) for _ in range(17)]
    assert got == expected


def test_a_lane_packs_the_documents_of_its_source_in_order(tmp_path):
    pieces = corpus(tmp_path, "gz-shards")  # 12 pieces, 8 lanes: lane 2 reads pieces 2 and 10
    order = ranks(pieces, 1, seq_len=5)[0]
    windows = [order.window(2) for _ in range(10)]
    docs = [t for p in (2, 10) for _, t in pieces.read(p, None)]
    stream = [t for text in docs for t in tokenize(text)]
    assert [t for w in windows for t in w] == stream[:60]


@pytest.mark.parametrize("kind,sources", [("gz-shards", 8), ("one-big-file", 8), ("few-gz", 3)])
def test_each_rank_opens_only_its_own_pieces(tmp_path, kind, sources):
    pieces = corpus(tmp_path, kind)
    opened = {}
    for r in range(4):
        order = ds.ShardOrder(Recorder(pieces), tokenize, 8, G, dp.lanes_of(G, 4, r), rank=r)
        for _ in range(12):
            [order.window(lane) for lane in order.lanes]
        opened[r] = {p for p, _ in order.pieces.opened}
    for r, got in opened.items():
        mine = {q for v in dp.lanes_of(G, 4, r) for q in [ds.source_of(v, sources, G)]}
        assert got <= {p for p in range(pieces.count) if p % sources in mine}
    if sources == G:  # one source per lane: no piece is opened by two ranks
        assert sum(len(p) for p in opened.values()) == len(set().union(*opened.values()))


@pytest.mark.parametrize("kind", ["gz-shards", "one-big-file", "map", "stream"])
def test_a_resume_mid_piece_starts_reading_where_its_lanes_stood(tmp_path, kind):
    pieces = corpus(tmp_path, kind)
    before = ranks(pieces, 2)
    for _ in range(3):
        step(before)
    state = checkpoint(before)
    lanes = [dp.LaneState(**json.loads(state[dp.lane_key(v)])) for v in range(G)]
    assert any(st.snap is not None and st.snap[1] not in (None, 0) for st in lanes)  # inside a piece
    recorder = Recorder(pieces)
    after = ds.ShardOrder(recorder, tokenize, 8, G, range(G))
    after.load_state_dict(state)
    step([after])
    starts = {piece: pos for piece, pos in recorder.opened}
    snaps = {}  # a source is read from the earliest snap of its lanes
    for v, st in sorted(enumerate(lanes), key=lambda x: -x[1].snap_doc):
        if st.snap:
            snaps[ds.source_of(v, after.sources, G)] = tuple(st.snap)
    for q, (c, pos) in snaps.items():
        assert starts[after.readers[q].piece_ids[c % len(after.readers[q].piece_ids)]] == pos


def test_a_finite_order_ends_when_a_source_ends(tmp_path):
    order = ranks(corpus(tmp_path, "gz-shards"), 1, infinite=False)[0]
    windows = list(order.rounds())
    tokens = sum(len(tokenize(t)) for t in TEXTS) * 4
    assert tokens // 9 - 12 * G <= len(windows) <= tokens // 9


def test_a_checkpoint_of_another_corpus_is_refused(tmp_path):
    state = checkpoint(ranks(corpus(tmp_path, "gz-shards"), 2))
    from torchtitan_runai.errors import UserError

    with pytest.raises(UserError, match="over 12 pieces of the corpus, this job's corpus makes 3"):
        ranks(corpus(tmp_path, "few-gz"), 2)[0].load_state_dict(state)


def test_a_source_with_no_documents_is_an_error_not_a_hang(tmp_path):
    files = [write_jsonl(tmp_path / f"{i}.jsonl.gz", [] if i == 1 else TEXTS, gz=True) for i in range(2)]
    with pytest.raises(ValueError, match="has no examples"):
        ds.ShardOrder(ds.LineFiles(files, text_of, 2), tokenize, 8, 2, range(2)).window(1)


# ---------------------------------------------------------------------------------------------
# the loader: ahead of the step, on a thread


def test_batches_are_made_ahead_and_the_state_is_the_last_one_handed_out(tmp_path):
    pieces = corpus(tmp_path, "gz-shards")
    loader = dp.LaneLoader(ranks(pieces, 1)[0], local_batch=4, prefetch=3)
    it = iter(loader)
    first = [next(it) for _ in range(4)]  # 2 steps
    import time

    time.sleep(0.5)  # the thread runs ahead, up to 3 batches
    assert loader.order.windows > 2
    state = loader.state_dict()
    assert {json.loads(state[dp.lane_key(v)])["windows"] for v in range(G)} == {2}
    again = dp.LaneLoader(ranks(pieces, 1)[0], local_batch=4)
    again.load_state_dict(state)
    reference = dp.LaneLoader(ranks(pieces, 1)[0], local_batch=4)
    ref = iter(reference)
    expected = [next(ref) for _ in range(8)]
    got = first + [b for b, _ in zip(iter(again), range(4))]
    assert all((a[0]["input"] == b[0]["input"]).all() and (a[1] == b[1]).all() for a, b in zip(got, expected))
    # a new iteration goes on from the last batch handed out, not from where the thread got to
    more = [b for b, _ in zip(iter(loader), range(4))]
    assert all((a[0]["input"] == b[0]["input"]).all() for a, b in zip(more, expected[4:]))


def test_an_error_while_reading_is_raised_in_the_training_thread(tmp_path):
    files = [write_jsonl(tmp_path / "a.jsonl", TEXTS)]
    (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text() + "not json\n")
    loader = dp.LaneLoader(ranks(ds.LineFiles(files, text_of, G), 1)[0], local_batch=8)
    with pytest.raises(ValueError, match="is not JSON"):
        for _ in loader:
            pass


# ---------------------------------------------------------------------------------------------
# an old checkpoint's order


def test_a_lanes_1_position_resumes_in_its_own_order_at_the_same_and_another_size(tmp_path):
    from datasets import Dataset

    data = Dataset.from_dict({"text": TEXTS})

    def loader(size, rank, legacy_only=False):
        lanes = dp.lanes_of(4, size, rank)
        build_lanes = lambda: dp.LaneLoader(  # noqa: E731
            dp.GlobalOrder(dp.MapDocuments(data, text_of), tokenize, 8, 4, lanes, rank=rank), 4 // size
        )
        build_shards = lambda: dp.LaneLoader(  # noqa: E731
            ds.ShardOrder(ds.MapRows(data, text_of, 4), tokenize, 8, 4, lanes, rank=rank), 4 // size
        )
        return dp.RunaiDataloader(build_lanes, None, None if legacy_only else build_shards)

    def batches(loaders, n):
        its = [iter(x) for x in loaders]
        return [[row.tolist() for it in its for row in next(it)[0]["input"]] for _ in range(n)]

    assert loader(1, 0).order == ds.FORMAT
    old = [loader(2, r, legacy_only=True) for r in range(2)]
    expected = batches([loader(1, 0, legacy_only=True)], 10)
    got = batches(old, 4)
    state = {}
    for x in old:
        state.update(x.state_dict())
    assert dp.saved_order(state) == dp.FORMAT
    for size in (2, 4):
        new = [loader(size, r) for r in range(size)]
        for x in new:
            x.state_dict()  # what the checkpointer asks first (the keys to load)
            x.load_state_dict(state)
        assert all(x.order == dp.FORMAT and x.format == dp.FORMAT for x in new)
        assert got + batches(new, 6) == expected
    fresh = batches([loader(1, 0)], 10)
    assert fresh != expected  # a fresh run's order is shards-1


# ---------------------------------------------------------------------------------------------
# through the real builder: a local streaming folder of gzipped shards, one large plain file


@pytest.mark.parametrize("layout", ["gz-folder", "one-big-file"])
def test_the_builder_resumes_a_sharded_corpus_at_another_size(tmp_path, layout):
    from test_data_position import loader_steps

    from torchtitan_runai.config import Data
    from torchtitan_runai.training import data as data_mod
    from torchtitan_runai.upstream import HuggingFaceTokenizer, JobConfig

    sys_path_tests()
    from tokgen import write_tokenizer

    tokenizer = HuggingFaceTokenizer(str(write_tokenizer(tmp_path / "tok")))
    folder = tmp_path / "data"
    folder.mkdir()
    texts = [f"{t} copy {c}" for c in range(4) for t in TEXTS]
    if layout == "gz-folder":
        for i in range(6):
            write_jsonl(folder / f"c4-train.{i:05d}-of-00006.json.gz", texts[i::6], gz=True)
    else:
        write_jsonl(folder / "all.jsonl", texts)
    job = JobConfig()
    job.training.dataset, job.training.dataset_path = "local", str(folder)
    job.training.seq_len, job.training.local_batch_size, job.training.global_batch_size = 8, 2, 4
    job.data = Data(streaming=True, cache_dir=str(tmp_path / "cache"))

    def build(dp_degree):
        return [data_mod.build_dataloader(dp_degree, r, tokenizer, job) for r in range(dp_degree)]

    expected = loader_steps(build(1), 40, local_batch=2)
    before = build(2)
    got = loader_steps(before, 17, local_batch=2)
    state: dict = {}
    for loader in before:
        state.update(loader.state_dict())
    assert json.loads(state[dp.POSITION_KEY])["format"] == ds.FORMAT
    assert json.loads(state[dp.POSITION_KEY])["pieces"] == (6 if layout == "gz-folder" else 4)
    job.training.local_batch_size = 1
    after = build(4)
    for loader in after:
        loader.load_state_dict(state)
    got += loader_steps(after, 23, local_batch=1)
    assert got == expected


def sys_path_tests():
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parents[2])
    if tests not in sys.path:
        sys.path.insert(0, tests)
