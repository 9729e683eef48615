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
        lines = "".join(
            json.dumps({"text": document(rng), "timestamp": "2019-04-25T12:57:54Z", "url": f"u{s}"}) + "\n"
            for _ in range(docs)
        )
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


# ---------------------------------------------------------------------------------------------
# c4 through the real ``datasets`` streaming client (``hf://`` paths: ``huggingface_hub``'s
# HfFileSystem) against a local fake Hub that counts the bytes of each file it serves

HUB_SHARDS = 16
C4_README = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/c4-train.*.json.gz
---
"""


def hub_child(dp_degree: int, tok: str, tmp: str) -> None:
    """A child process (HF_ENDPOINT set before any import): ``dp_degree`` ranks of ``training.dataset =
    "c4"`` trained STEPS steps; prints the global batches' digest."""
    import hashlib

    from torchtitan_runai.config import Data
    from torchtitan_runai.training import data as data_mod
    from torchtitan_runai.upstream import HuggingFaceTokenizer, JobConfig

    job = JobConfig()
    job.training.dataset, job.training.dataset_path = "c4", None
    job.training.seq_len, job.training.global_batch_size = SEQ_LEN, GLOBAL_BATCH
    job.training.local_batch_size = GLOBAL_BATCH // dp_degree
    job.data = Data(cache_dir=str(Path(tmp) / "cache"))
    tokenizer = HuggingFaceTokenizer(tok)
    loaders = [data_mod.build_dataloader(dp_degree, r, tokenizer, job) for r in range(dp_degree)]
    iterators = [iter(loader) for loader in loaders]
    batches = [sum((next(it)[0]["input"].tolist() for it in iterators), []) for _ in range(STEPS)]
    deadline = time.monotonic() + 120
    while any(x.impl._thread.is_alive() and not _queue_full(x) for x in loaders) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    print("DIGEST", hashlib.sha1(json.dumps(batches).encode()).hexdigest(), flush=True)


def served_to(hub, dp_degree: int, tok: str, tmp: Path) -> tuple[int, int, str]:
    """(bytes of the shards the fake Hub served, of everything else, the batches' digest) for one run."""
    import os
    import subprocess

    before_shards, before_all = _served(hub)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[3]), env.get("PYTHONPATH", "")])
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_data_bytes as t; "
    code += f"t.hub_child({dp_degree}, {tok!r}, {str(tmp)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    digest = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("DIGEST"))
    after_shards, after_all = _served(hub)
    return after_shards - before_shards, (after_all - after_shards) - (before_all - before_shards), digest


def _served(hub) -> tuple[int, int]:
    with hub._lock:
        return sum(n for p, n in hub.served.items() if p.endswith(".json.gz")), sum(hub.served.values())


def test_four_ranks_pull_from_the_hub_what_one_rank_pulls(tmp_path, tokenizer):
    from fakehub import FakeHub

    shards = c4_like(tmp_path / "c4", shards=HUB_SHARDS, docs=60)
    tok = str(write_tokenizer(tmp_path / "tok"))
    with FakeHub() as hub:
        hub.add_file("allenai/c4", "README.md", C4_README.encode(), "dataset")
        for f in sorted(shards.iterdir()):
            hub.add_file("allenai/c4", f"en/{f.name}", f.read_bytes(), "dataset")
        corpus_bytes = sum(f.stat().st_size for f in shards.iterdir())
        one, one_meta, expected = served_to(hub, 1, tok, tmp_path / "one")
        four, four_meta, got = served_to(hub, 4, tok, tmp_path / "four")
    assert got == expected  # the same global batches
    assert 0 < one < corpus_bytes  # a part of the corpus is pulled
    print(
        f"\nc4 from the fake Hub: corpus {corpus_bytes} B; DP 1 pulled {one} B (+{one_meta} B of other repo files), "
        f"DP 4 {four} B (+{four_meta} B) ({four / one:.2f}x)"
    )
    assert four <= 1.1 * one, f"DP 4 pulled {four} bytes of shards, DP 1 {one} ({four / one:.2f}x)"
