"""The global data position (lanes): the same windows at every data-parallel size, exact resume
across a change of size, map-style and streaming alike, through epochs and dropped connections."""

from __future__ import annotations

import json

import pytest

from torchtitan_runai.training import data_position as dp

TEXTS = [f"document {i} " + "word " * (i % 7 + 1) + f"end {i}" for i in range(60)]


def tokenize(text: str) -> list[int]:
    return [1] + [len(w) * 31 + j for j, w in enumerate(text.split())] + [2]


def text_of(sample: dict) -> str:
    return sample["text"]


def map_docs(infinite: bool = True):
    from datasets import Dataset

    return dp.MapDocuments(Dataset.from_dict({"text": TEXTS}), text_of, infinite)


def stream_docs(**kwargs):
    from datasets import Dataset

    return dp.StreamDocuments(Dataset.from_dict({"text": TEXTS}).to_iterable_dataset(num_shards=3), text_of, **kwargs)


def ranks(global_batch: int, dp_degree: int, documents=map_docs, seq_len: int = 8) -> list[dp.GlobalOrder]:
    return [
        dp.GlobalOrder(documents(), tokenize, seq_len, global_batch, dp.lanes_of(global_batch, dp_degree, r), rank=r)
        for r in range(dp_degree)
    ]


def step(orders: list[dp.GlobalOrder]) -> list[tuple[int, ...]]:
    """One step: every rank's windows, in lane order (the global batch)."""
    out = {lane: tuple(o.window(lane)) for o in orders for lane in o.lanes}
    return [out[lane] for lane in sorted(out)]


def checkpoint(orders: list[dp.GlobalOrder]) -> dict[str, bytes]:
    state: dict = {}
    for o in orders:
        for key, value in o.state_dict().items():
            assert key not in state or key == dp.POSITION_KEY  # every lane is written by one rank
            state[key] = value
    return json.loads(json.dumps({k: v.decode() for k, v in state.items()}))  # text, as in a checkpoint


def test_lanes_split_the_global_batch():
    assert [list(dp.lanes_of(8, 4, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="does not divide"):
        dp.lanes_of(8, 3, 0)


@pytest.mark.parametrize("documents", [map_docs, stream_docs], ids=["map", "stream"])
@pytest.mark.parametrize("n,m", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_resume_at_another_size_continues_the_uninterrupted_order(documents, n, m):
    reference = ranks(4, 1, documents)
    expected = [step(reference) for _ in range(40)]  # ~4 epochs of 60 documents
    before = ranks(4, n, documents)
    got = [step(before) for _ in range(25)]
    after = ranks(4, m, documents)
    for o in after:
        o.load_state_dict(checkpoint(before))
    got += [step(after) for _ in range(15)]
    assert got == expected


def test_the_order_does_not_depend_on_the_size_nor_on_streaming():
    one = [step(ranks(4, 1)) for _ in range(1)]
    orders = {
        name: ranks(4, size, docs)
        for name, size, docs in [("1", 1, map_docs), ("4", 4, map_docs), ("stream2", 2, stream_docs)]
    }
    runs = {name: [step(o) for _ in range(30)] for name, o in orders.items()}
    assert runs["1"] == runs["4"] == runs["stream2"]
    assert runs["1"][0] == one[0]


def test_a_lane_packs_its_documents_like_torchtitan():
    """Lane v's windows are the concatenation of documents v, v+G, ... cut every seq_len + 1 tokens."""
    order = ranks(4, 1, seq_len=5)[0]
    windows = [order.window(1) for _ in range(6)]
    stream = [t for i in range(1, 60, 4) for t in tokenize(TEXTS[i])]
    assert [t for w in windows for t in w] == stream[:36]


def test_a_finite_order_ends_after_one_epoch():
    order = dp.GlobalOrder(map_docs(infinite=False), tokenize, 8, 2, range(2))
    windows = list(order.rounds())
    tokens = sum(len(tokenize(t)) for t in TEXTS)
    assert tokens // 9 - 2 <= len(windows) <= tokens // 9


def test_a_checkpoint_of_another_global_batch_is_refused():
    state = checkpoint(ranks(4, 2))
    with pytest.raises(ValueError, match="global_batch 4 in the checkpoint, 8 here"):
        ranks(8, 2)[0].load_state_dict(state)


class FlakyStream:
    """An iterable dataset with datasets' state API whose reads fail at chosen positions, once."""

    def __init__(self, fail_at: set[int], error: Exception):
        self.pos, self.fail_at, self.error = 0, set(fail_at), error

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]

    def __iter__(self):
        while self.pos < len(TEXTS):
            if self.pos in self.fail_at:
                self.fail_at.discard(self.pos)
                raise self.error
            self.pos += 1
            yield {"text": TEXTS[self.pos - 1]}


def test_a_dropped_stream_resumes_where_it_was():
    waits = []
    flaky = dp.StreamDocuments(
        FlakyStream({5, 17}, ConnectionError("Connection reset by peer")), text_of, sleep=waits.append, backoff_s=0.5
    )
    order = dp.GlobalOrder(flaky, tokenize, 8, 2, range(2))
    clean = dp.GlobalOrder(map_docs(), tokenize, 8, 2, range(2))
    assert [order.window(lane) for _ in range(20) for lane in range(2)] == [
        clean.window(lane) for _ in range(20) for lane in range(2)
    ]
    assert waits == [0.5, 0.5]


class DeadStream(FlakyStream):
    def __iter__(self):
        raise self.error
        yield  # a generator


def test_a_stream_gives_up_after_bounded_retries_and_at_once_on_other_errors():
    waits = []
    dead = dp.StreamDocuments(
        DeadStream(set(), ConnectionError("reset")),
        text_of,
        retries=3,
        sleep=waits.append,
        backoff_s=1,
        max_backoff_s=3,
    )
    with pytest.raises(ConnectionError):
        dp.GlobalOrder(dead, tokenize, 8, 1, range(1)).window(0)
    assert waits == [1, 2, 3]
    broken = dp.StreamDocuments(FlakyStream({0}, ValueError("not transient")), text_of, sleep=waits.append)
    with pytest.raises(ValueError, match="not transient"):
        dp.GlobalOrder(broken, tokenize, 8, 1, range(1)).window(0)
    assert waits == [1, 2, 3]


def test_step_recorder_writes_each_ranks_share(tmp_path, monkeypatch):
    monkeypatch.setenv(dp.TRACE_ENV, str(tmp_path / "t.jsonl"))
    monkeypatch.setenv("RANK", "3")
    dp.StepRecorder().record(7, 1.5, 0.25)
    rec = json.loads((tmp_path / "t.jsonl").read_text())
    assert rec == {"rank": 3, "step": 7, "loss": (1.5).hex(), "lr": (0.25).hex()}


# ---------------------------------------------------------------------------------------------
# the real builder (training.dataset / data settings -> torchtitan's Trainer's loader), per dataset


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers
    from tokgen import write_tokenizer

    from torchtitan_runai.upstream import HuggingFaceTokenizer

    return HuggingFaceTokenizer(str(write_tokenizer(tmp_path_factory.mktemp("tok"))))


def dataset_job(tmp_path, monkeypatch, kind: str):
    """A JobConfig for ``kind``: local map-style / streaming files, c4_test's folder, or c4 (its Hub
    stream replaced by the same kind of datasets json stream, from a local file: no network here)."""
    from datasets import load_dataset

    from torchtitan_runai.config import Data
    from torchtitan_runai.upstream import DatasetConfig, JobConfig, text_datasets

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "part.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    job = JobConfig()
    job.training.seq_len, job.training.local_batch_size = 8, 2
    job.data = Data(cache_dir=str(tmp_path / "cache"), streaming=kind == "local-stream")
    job.training.dataset, job.training.dataset_path = {
        "local": ("local", str(folder)),
        "local-stream": ("local", str(folder)),
        "c4_test": ("c4_test", str(folder)),
        "c4": ("c4", None),
    }[kind]
    if kind == "c4":

        def stream(path):
            return load_dataset("json", data_files=[str(folder / "part.jsonl")], split="train", streaming=True)

        entry = text_datasets.DATASETS["c4"]
        monkeypatch.setitem(text_datasets.DATASETS, "c4", DatasetConfig(entry.path, stream, entry.sample_processor))
    return job


def loader_steps(loaders, steps: int, local_batch: int, global_batch: int = 4) -> list:
    """Each step's global batch, as the Trainer pulls it: A microbatches of every rank."""
    iters = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        batch = []
        for it in iters:
            for _ in range(global_batch // (len(loaders) * local_batch)):
                inputs, labels = next(it)
                batch += [x.tolist() + [y[-1].item()] for x, y in zip(inputs["input"], labels)]
        out.append(batch)
    return out


@pytest.mark.parametrize("kind", ["local", "local-stream", "c4_test", "c4"])
def test_every_dataset_resumes_at_another_size(tmp_path, monkeypatch, hf_tokenizer, kind):
    from torchtitan_runai.training import data as data_mod

    job = dataset_job(tmp_path, monkeypatch, kind)
    job.training.global_batch_size = 4

    def build(dp_degree):
        return [data_mod.build_dataloader(dp_degree, r, hf_tokenizer, job) for r in range(dp_degree)]

    expected = loader_steps(build(1), 12, local_batch=2)
    before = build(2)
    got = loader_steps(before, 5, local_batch=2)
    state: dict = {}
    for loader in before:
        state.update(loader.state_dict())
    job.training.local_batch_size = 1
    after = build(4)
    for loader in after:
        loader.load_state_dict(state)
    got += loader_steps(after, 7, local_batch=1)
    assert got == expected
