"""One reader per data-parallel rank (``training.data_peers``): who is a peer (torchtitan's own mesh says
the same), and with 4 real processes over gloo at TP 2 x DP 2 through ``training.data.build_dataloader``:
each peer trains on its reader's batches and holds its reader's data position; the batches are those of
DP 2 without peers; a finite order ends on every peer; a reader's failure fails its peers, naming it.

The bytes the peers do not read are counted from outside the ranks in
``tests/integration/test_peer_reads.py``."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import random
import sys
import traceback
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ helpers
from conftest import free_port  # noqa: E402
from tokgen import write_tokenizer  # noqa: E402

from torchtitan_runai.training.data_peers import peer_groups  # noqa: E402

GLOBAL_BATCH, SEQ_LEN, BATCHES = 8, 32, 5


@pytest.mark.parametrize("pp,dp_replicate,dp_shard,cp,tp", [(2, 1, 2, 2, 2), (1, 2, 2, 1, 2), (2, 2, 1, 1, 1)])
def test_peers_are_the_ranks_of_torchtitans_batch_coordinate(pp, dp_replicate, dp_shard, cp, tp):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torchtitan_runai.upstream import ParallelDims

    world = pp * dp_replicate * dp_shard * cp * tp
    groups = peer_groups(pp, dp_replicate * dp_shard, cp, tp)
    assert sorted(r for g in groups for r in g) == list(range(world))
    for rank in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            dims = ParallelDims(
                dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp, pp=pp, ep=1, etp=1, world_size=world
            )
            dims.build_mesh()
            batch = dims.get_optional_mesh("batch")
            coordinate = batch.get_local_rank() if batch is not None else 0
        finally:
            dist.destroy_process_group()
        assert rank in groups[coordinate]
    assert [g[0] for g in groups] == sorted(g[0] for g in groups) and groups[0][0] == 0  # rank 0 reads


def corpus(folder: Path) -> Path:
    folder.mkdir()
    rng = random.Random(0)
    for s in range(6):
        text = "".join(
            json.dumps({"text": " ".join(f"w{rng.randint(0, 400)}" for _ in range(rng.randint(20, 90)))}) + "\n"
            for _ in range(30)
        )
        (folder / f"s{s}.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    return folder


def job_config(path: Path, tp: int, cache: Path):
    from torchtitan_runai.config import Data
    from torchtitan_runai.upstream import JobConfig

    job = JobConfig()
    job.training.dataset, job.training.dataset_path = "local", str(path)
    job.training.seq_len, job.training.global_batch_size = SEQ_LEN, GLOBAL_BATCH
    job.training.local_batch_size = GLOBAL_BATCH // 2
    job.parallelism.tensor_parallel_degree = tp
    job.data = Data(streaming=True, cache_dir=str(cache))
    return job


def take(loader, n: int) -> list:
    out = []
    for (inputs, labels), _ in zip(loader, range(n)):
        out.append((inputs["input"].tolist(), labels.tolist(), dict(loader.state_dict())))
    return out


def rank_main(rank: int, port: int, path: str, tok: str, cache: str, results) -> None:
    """One rank of TP 2 x DP 2: its batches, a finite order's length, a reader's failure."""
    out: dict = {}
    try:
        import torch.distributed as dist

        from torchtitan_runai.training import data as data_mod
        from torchtitan_runai.upstream import HuggingFaceTokenizer

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
        dp_rank = rank // 2  # TP 2 x DP 2: ranks 0, 1 are data-parallel rank 0
        job = job_config(Path(path), 2, Path(cache))
        tokenizer = HuggingFaceTokenizer(tok)

        loader = data_mod.build_dataloader(2, dp_rank, tokenizer, job)
        before = dict(loader.state_dict())
        out["batches"] = {"before": before, "batches": take(loader, BATCHES), "built": loader._impl is not None}

        out["finite"] = sum(1 for _ in data_mod.build_dataloader(2, dp_rank, tokenizer, job, infinite=False))

        loader = data_mod.build_dataloader(2, dp_rank, tokenizer, job)
        if loader.peers.reads and dp_rank == 1:
            loader.impl.order.tokenize = lambda text: 1 / 0  # rank 2's reading fails
        try:
            take(loader, BATCHES)
            out["failure"] = "no error"
        except Exception as error:
            out["failure"] = f"{type(error).__name__}: {error}"
        dist.destroy_process_group()
    except BaseException:
        out["error"] = traceback.format_exc()
    results.put((rank, out))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict:
    """{what: {rank: result}} of 4 real processes over gloo, each building the loaders of TP 2 x DP 2."""
    tmp_path = tmp_path_factory.mktemp("peers")
    path, tok = corpus(tmp_path / "c4"), str(write_tokenizer(tmp_path / "tok"))
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=rank_main, args=(r, port, str(path), tok, str(tmp_path / "cache"), results))
        for r in range(4)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert not any("error" in out for out in got.values()), got
    return {"path": tmp_path, **{what: {r: got[r][what] for r in got} for what in ("batches", "finite", "failure")}}


def test_peers_train_on_their_readers_batches_and_hold_its_position(four_ranks):
    got, tmp_path = four_ranks["batches"], four_ranks["path"]
    assert got[0]["built"] and got[2]["built"] and not got[1]["built"] and not got[3]["built"]  # peers read nothing
    assert got[1]["batches"] == got[0]["batches"] and got[3]["batches"] == got[2]["batches"]
    assert got[1]["before"] == {} and got[0]["before"]  # a peer holds no position before its first batch

    from torchtitan_runai.training import data as data_mod
    from torchtitan_runai.upstream import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(str(tmp_path / "tok"))
    job = job_config(tmp_path / "c4", 1, tmp_path / "cache")
    for dp_rank, reader in ((0, 0), (1, 2)):  # the same batches and positions as DP 2 without peers
        alone = take(data_mod.build_dataloader(2, dp_rank, tokenizer, job), BATCHES)
        assert got[reader]["batches"] == alone


def test_a_finite_order_ends_on_every_peer(four_ranks):
    got = four_ranks["finite"]
    assert got[0] == got[1] > 0 and got[2] == got[3] > 0  # each peer as many as its reader (ranks' ends differ)


def test_a_readers_failure_fails_its_peers_naming_it(four_ranks):
    got = four_ranks["failure"]
    assert got[2].startswith("ZeroDivisionError"), got
    assert got[3] == "RuntimeError: rank 2, which reads this rank's data, failed: ZeroDivisionError: division by zero"
    assert got[0] == got[1] == "no error"
