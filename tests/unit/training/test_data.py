"""training.data: local datasets in every format, per-rank shares, exact resume, stream retry, clear errors.

The launcher's own dataset checks (inputs.data_files) are tests/unit/inputs/test_data_files.py.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from fakehub import FakeHub
from tokgen import write_tokenizer

from torchtitan_runai.config import Data
from torchtitan_runai.errors import UserError
from torchtitan_runai.inputs import data_files
from torchtitan_runai.training import data as data_mod
from torchtitan_runai.training.data import load_local_dataset

TEXTS = [f"sample number {i}: the llama reads text {i * 7} times." for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from torchtitan_runai.upstream import HuggingFaceTokenizer

    return HuggingFaceTokenizer(str(write_tokenizer(tmp_path_factory.mktemp("tok"))))


@pytest.fixture
def cfg(tmp_path):
    return Data(cache_dir=str(tmp_path / "ds_cache"))


def write_jsonl(path: Path, texts, column="text", gz=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts))
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


def texts_of(ds, column="text"):
    return [row[column] for row in ds]


# ---- formats -------------------------------------------------------------------------------------


def test_jsonl_file_and_gz(tmp_path, cfg):
    assert texts_of(load_local_dataset(str(write_jsonl(tmp_path / "a.jsonl", TEXTS)), cfg)) == TEXTS
    gz = write_jsonl(tmp_path / "b.jsonl.gz", TEXTS, gz=True)
    assert texts_of(load_local_dataset(str(gz), cfg)) == TEXTS


def test_json_array_file(tmp_path, cfg):
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in TEXTS]))
    assert texts_of(load_local_dataset(str(tmp_path / "a.json"), cfg)) == TEXTS


def test_parquet_and_arrow_files(tmp_path, cfg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"body": TEXTS})
    pq.write_table(table, tmp_path / "a.parquet")
    with pa.ipc.new_stream(tmp_path / "a.arrow", table.schema) as writer:
        writer.write_table(table)
    cfg.text_column = "body"
    assert texts_of(load_local_dataset(str(tmp_path / "a.parquet"), cfg), "body") == TEXTS
    assert texts_of(load_local_dataset(str(tmp_path / "a.arrow"), cfg), "body") == TEXTS


def test_save_to_disk_folder(tmp_path, cfg):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "saved"))
    assert texts_of(load_local_dataset(str(tmp_path / "saved"), cfg)) == TEXTS
    DatasetDict({"train": Dataset.from_dict({"text": TEXTS})}).save_to_disk(str(tmp_path / "dd"))
    assert texts_of(load_local_dataset(str(tmp_path / "dd"), cfg)) == TEXTS


def test_plain_text_by_paragraph_and_line(tmp_path, cfg):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\nsecond para\n")
    assert len(load_local_dataset(str(tmp_path / "a.txt"), cfg)) == 2
    cfg.text_sample_by = "line"
    assert texts_of(load_local_dataset(str(tmp_path / "a.txt"), cfg))[0] == "first para"


def test_folder_of_shards_in_order(tmp_path, cfg):
    for i in range(4):
        write_jsonl(tmp_path / "shards" / f"part-{i:03d}.jsonl", TEXTS[i * 10 : (i + 1) * 10])
    (tmp_path / "shards" / "README.md").write_text("ignored")
    assert texts_of(load_local_dataset(str(tmp_path / "shards"), cfg)) == TEXTS


def test_explicit_format_for_files_without_suffix(tmp_path, cfg):
    write_jsonl(tmp_path / "d" / "data", TEXTS)
    cfg.format = "jsonl"
    assert texts_of(load_local_dataset(str(tmp_path / "d"), cfg)) == TEXTS


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setup, setting, words",
    [
        (lambda p: None, "training.dataset_path", "does not exist"),
        (lambda p: (p / "x.jsonl").write_text(""), "training.dataset_path", "empty"),
        (lambda p: (p / "x.jsonl").write_text("\n\n"), "training.dataset_path", "no records"),
        (lambda p: (p / "x").mkdir(), "training.dataset_path", "no data files"),
        (
            lambda p: (
                (p / "x").mkdir(),
                (p / "x" / "a.txt").write_text("t"),
                (p / "x" / "b.parquet").write_bytes(b"x"),
            ),
            "training.dataset_path",
            "mixes",
        ),
        (
            lambda p: write_jsonl(p / "x.jsonl", TEXTS, column="content"),
            "data.text_column",
            "columns: ['content', 'id']",
        ),
    ],
)
def test_clear_errors(tmp_path, cfg, setup, setting, words):
    setup(tmp_path)
    target = tmp_path / ("x.jsonl" if (tmp_path / "x.jsonl").exists() else "x")
    for check in (
        lambda: load_local_dataset(str(target), cfg),
        lambda: data_files.check_dataset("local", str(target), cfg),
    ):
        with pytest.raises(UserError) as err:
            check()
        assert err.value.setting == setting and words in err.value.line()


# ---- the dataloader ------------------------------------------------------------------------------


def job_config(path: str, data: Data, seq_len: int = 16, batch: int = 2):
    from torchtitan_runai.upstream import JobConfig

    job = JobConfig()
    job.training.dataset = "local"
    job.training.dataset_path = path
    job.training.seq_len = seq_len
    job.training.local_batch_size = batch
    job.data = data
    return job


def first_tokens(loader, n):
    batches = iter(loader)
    return [(inputs["input"].clone(), labels.clone()) for inputs, labels in (next(batches) for _ in range(n))]


@pytest.mark.parametrize("streaming", [False, True])
def test_each_dp_rank_reads_its_own_share(tmp_path, cfg, tokenizer, streaming):
    for i in range(4):
        write_jsonl(tmp_path / "shards" / f"p{i}.jsonl", TEXTS[i * 10 : (i + 1) * 10])
    cfg.streaming = streaming
    job = job_config(str(tmp_path / "shards"), cfg, batch=1)  # one lane per rank: its windows are one stream
    seen = []
    for rank in range(2):
        loader = data_mod.build_dataloader(2, rank, tokenizer, job, infinite=False)
        windows = []
        for inputs, labels in loader:
            assert inputs["input"].shape[1] == 16 and labels.shape == inputs["input"].shape
            windows += [x.tolist() + [y[-1].item()] for x, y in zip(inputs["input"], labels)]
        joined = tokenizer.decode([t for w in windows for t in w])
        seen.append({t for t in TEXTS if t in joined})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    assert len(seen[0] | seen[1]) >= len(TEXTS) - 4  # a partial last window per rank is dropped


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_from_dataloader_state_is_exact(tmp_path, cfg, tokenizer, streaming):
    for i in range(2):
        write_jsonl(tmp_path / "shards" / f"p{i}.jsonl", TEXTS[i * 20 : (i + 1) * 20])
    cfg.streaming = streaming
    job = job_config(str(tmp_path / "shards"), cfg)
    full = first_tokens(data_mod.build_dataloader(1, 0, tokenizer, job), 8)

    first = data_mod.build_dataloader(1, 0, tokenizer, job)
    head = first_tokens(first, 3)
    state = first.state_dict()
    resumed = data_mod.build_dataloader(1, 0, tokenizer, job)
    resumed.load_state_dict(state)
    tail = first_tokens(resumed, 5)
    for (a, la), (b, lb) in zip(full, head + tail):
        assert a.equal(b) and la.equal(lb)


def _flaky_stream(shards, marker, fail_at):
    for shard in shards:
        for i, text in enumerate(TEXTS[shard * 20 : (shard + 1) * 20]):
            if marker and shard == 0 and i == fail_at and not Path(marker).exists():
                Path(marker).write_text("failed once")
                raise ConnectionError("Connection reset by peer")
            yield {"text": text}


@pytest.fixture
def flaky_dataset():
    """Registers "flaky_test" in torchtitan's dataset registry: a stream that drops once."""
    from datasets import IterableDataset

    from torchtitan_runai.upstream import DatasetConfig, text_datasets

    def register(marker: str | None, fail_at: int = 7):
        text_datasets.DATASETS["flaky_test"] = DatasetConfig(
            path="unused",
            loader=lambda _: IterableDataset.from_generator(
                _flaky_stream, gen_kwargs={"shards": [0, 1], "marker": marker, "fail_at": fail_at}
            ),
            sample_processor=lambda sample: sample["text"],
        )

    yield register
    text_datasets.DATASETS.pop("flaky_test", None)


def stream_tokens(tokenizer, data: Data, sleeps=None):
    cls = data_mod.ResilientTextDataset
    ds = cls(
        dataset_name="flaky_test",
        dataset_path=None,
        tokenizer=tokenizer,
        seq_len=16,
        data=data,
        sleep=(sleeps.append if sleeps is not None else lambda s: None),
    )
    return [x["input"].tolist() for x, _ in ds]


def test_stream_resumes_after_a_dropped_connection(tokenizer, flaky_dataset, tmp_path):
    flaky_dataset(None)
    clean = stream_tokens(tokenizer, Data())
    flaky_dataset(str(tmp_path / "marker"))
    sleeps: list[float] = []
    assert stream_tokens(tokenizer, Data(backoff_s=0.5), sleeps) == clean
    assert sleeps == [0.5] and (tmp_path / "marker").exists()


def test_stream_gives_up_after_bounded_retries(tokenizer, flaky_dataset):
    from datasets import IterableDataset

    from torchtitan_runai.upstream import DatasetConfig, text_datasets

    def always_down():
        yield {"text": "one"}
        raise ConnectionError("down")

    text_datasets.DATASETS["flaky_test"] = DatasetConfig(
        "unused", lambda _: IterableDataset.from_generator(always_down), lambda s: s["text"]
    )
    sleeps: list[float] = []
    with pytest.raises(ConnectionError):
        stream_tokens(tokenizer, Data(retries=3, backoff_s=1, max_backoff_s=2), sleeps)
    assert sleeps == [1, 2, 2]


def test_hub_loader_retries_real_429_then_succeeds(monkeypatch):
    """c4's loader is wrapped: a 429 / 503 from the Hub (real client, fake server) is retried."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import hf_raise_for_status

    from torchtitan_runai.upstream import text_datasets

    data_mod.register_datasets(Data(backoff_s=0.001))
    assert text_datasets.DATASETS["c4"].path == "allenai/c4"
    original = text_datasets.DATASETS["c4"].loader.__wrapped_loader__
    with FakeHub() as hub:
        hub.add_file("allenai/c4", "en/c4-train.00000-of-01024.json.gz", b"x", repo_type="dataset")
        hub.fail(429, 2)
        hub.fail(503, 1)

        def loader(path):
            url = f"{hub.url}/datasets/{path}/resolve/main/en/c4-train.00000-of-01024.json.gz"
            response = get_session().get(url)
            hf_raise_for_status(response)
            return response.content

        wrapped = data_mod._retrying_loader(loader, Data(backoff_s=0.001))
        assert wrapped("allenai/c4") == b"x"
        assert len(hub.requests) == 4
        hub.fail(404, 1)
        with pytest.raises(Exception, match="404"):
            wrapped("allenai/c4")  # not transient: no retry
    # registering again does not wrap twice
    data_mod.register_datasets(Data())
    assert text_datasets.DATASETS["c4"].loader.__wrapped_loader__ is original


def test_a_rank_under_the_launcher_skips_the_content_check(tmp_path, monkeypatch):
    from torchtitan_runai.lifetime import LAUNCHER_ENV
    from torchtitan_runai.training import data as data_mod

    seen = []
    monkeypatch.setattr(data_mod, "check_dataset", lambda *a, **k: seen.append(k.get("content", True)))
    monkeypatch.setattr(data_mod, "build_peers", lambda *a, **k: None)
    job = SimpleNamespace(
        training=SimpleNamespace(dataset="local", dataset_path=str(tmp_path)),
        data=Data(),
        comm=SimpleNamespace(init_timeout_seconds=1, train_timeout_seconds=1),
        parallelism=SimpleNamespace(),
    )
    monkeypatch.delenv(LAUNCHER_ENV, raising=False)
    data_mod.build_dataloader(1, 0, None, job)
    monkeypatch.setenv(LAUNCHER_ENV, "1 2")
    data_mod.build_dataloader(1, 0, None, job)
    assert seen == [True, False]
