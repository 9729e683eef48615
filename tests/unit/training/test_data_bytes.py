"""Bytes read by all ranks together, counted by the kernel (``/proc/self/io`` ``rchar``: every byte a
``read`` returned to this process), not by the loader: at data-parallel size 4 the ranks read no more
than 1.1x what one rank reads alone for the same global batch and steps.

The ranks are the real loaders (``training.data.build_dataloader``, ``training.dataset = "local"``,
``data.streaming``), built in this process one after another; each one's thread is let run until its
queue is full (it then blocks, reading nothing) before the counter is read."""

from __future__ import annotations

import gzip
import json
import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ helpers
from tokgen import write_tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/<pid>/io")

GLOBAL_BATCH, SEQ_LEN, STEPS = 8, 128, 20
WORDS = [
    "".join(random.Random(i).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(random.Random(-i).randint(2, 9)))
    for i in range(3000)
]


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def document(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 600)))


def c4_like(folder: Path, shards: int, docs: int) -> Path:
    folder.mkdir()
    rng = random.Random(0)
    for s in range(shards):
        lines = "".join(json.dumps({"text": document(rng), "url": f"u{s}"}) + "\n" for _ in range(docs))
        (folder / f"c4-train.{s:05d}-of-{shards:05d}.json.gz").write_bytes(gzip.compress(lines.encode()))
    return folder


def one_file(folder: Path, docs: int) -> Path:
    folder.mkdir()
    rng = random.Random(1)
    path = folder / "all.jsonl"
    path.write_text("".join(json.dumps({"text": document(rng)}) + "\n" for _ in range(docs)))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from torchtitan_runai.upstream import HuggingFaceTokenizer

    return HuggingFaceTokenizer(str(write_tokenizer(tmp_path_factory.mktemp("tok"))))


def bytes_read(path: Path, dp_degree: int, tokenizer, tmp_path: Path) -> tuple[int, list]:
    """(bytes read by ``dp_degree`` ranks for STEPS steps + the batches queued ahead, the batches)."""
    from torchtitan_runai.config import Data
    from torchtitan_runai.training import data as data_mod
    from torchtitan_runai.upstream import JobConfig

    job = JobConfig()
    job.training.dataset, job.training.dataset_path = "local", str(path)
    job.training.seq_len, job.training.global_batch_size = SEQ_LEN, GLOBAL_BATCH
    job.training.local_batch_size = GLOBAL_BATCH // dp_degree
    job.data = Data(streaming=True, cache_dir=str(tmp_path / "cache"))
    loaders = [data_mod.build_dataloader(dp_degree, r, tokenizer, job) for r in range(dp_degree)]
    for loader in loaders:
        loader.state_dict()  # built (files listed), nothing read yet
    before = rchar()
    iterators = [iter(loader) for loader in loaders]
    batches = [[next(it)[0]["input"].tolist() for it in iterators] for _ in range(STEPS)]
    deadline = time.monotonic() + 60
    while any(x.impl._thread.is_alive() and not _queue_full(x) for x in loaders) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return rchar() - before, [sum(step, []) for step in batches]


def _queue_full(loader) -> bool:
    return loader.impl.queued() >= loader.impl.prefetch


@pytest.mark.parametrize("corpus", ["gz-shards", "one-big-file"])
def test_four_ranks_read_what_one_rank_reads(tmp_path, tokenizer, corpus):
    if corpus == "gz-shards":
        path = c4_like(tmp_path / "c4", shards=64, docs=60)
    else:
        path = one_file(tmp_path / "one", docs=1500)
    corpus_bytes = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()))
    bytes_read(path, 1, tokenizer, tmp_path)  # warm-up: first-use imports are not the data's
    one, expected = bytes_read(path, 1, tokenizer, tmp_path)
    four, got = bytes_read(path, 4, tokenizer, tmp_path)
    assert got == expected  # the same global batches
    assert one < corpus_bytes / 4  # a small part of the corpus is consumed...
    assert four <= 1.1 * one, f"DP 4 read {four} bytes, DP 1 {one} ({four / one:.2f}x)"
