"""What each data-parallel rank reads, with the sharded global order (``training.data_shards``), on CPU.

Usage (repository root; ~2-4 min on 2 shared cores, most of it DP 512's 512 simulated ranks):

    python -m bench.data_scale --out bench/results

A c4-shaped corpus is generated once (``--corpus``, default /tmp/bench-c4: 1,024 gzipped JSON-lines
shards named like allenai/c4's ``en/c4-train.NNNNN-of-01024.json.gz``). For data-parallel sizes 1, 8,
64 and 512 at one global batch (``--global-batch`` sequences of ``--seq-len`` tokens, ``--steps``
steps), every rank is simulated in this process, one after another, with the real order
(``ShardOrder`` over ``LineFiles``), and its files are opened through a counting wrapper (the raw
file's bytes, before gzip: what a disk or the network delivers). Per rank: bytes read, bytes used
(uncompressed, of the JSON lines it parsed), documents parsed per step, seconds to
make one step's windows (read + decode + tokenize; the loader does this on its thread, ahead of the
step). The total over all ranks against DP 1's is the figure of merit (issue 26: <= 1.1x at any DP).

The same order is then read through ``datasets``' streaming client (``StreamShards``, the path c4
from the Hub takes) for ``--datasets-dp`` sizes, bytes counted by the kernel (``/proc/self/io``).
Through a fake Hub it is not run here: ``tests/unit/training/test_data_bytes.py`` does it (the real
``datasets`` client over ``hf://`` paths, ``huggingface_hub``'s own HTTP client, no ``aiohttp``;
``tests/fakehub.py`` counts the bytes it serves) at DP 4 against DP 1.

The tokenizer is a whitespace split with a hashed id per word (a real BPE costs more per token, the
same at every DP: it moves time per batch, not bytes).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import platform
import random
import statistics
import time
import zlib
from datetime import date
from pathlib import Path

from torchtitan_runai.training import data_position as dp
from torchtitan_runai.training import data_shards as ds

SHARDS = 1024


def build_corpus(folder: Path, docs_per_shard: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"c4-train.{s:05d}-of-{SHARDS:05d}.json.gz" for s in range(SHARDS)]
    if all(f.exists() for f in files):
        return [str(f) for f in files]
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("etaoinshrdlcumwfgypbvkjxqz") for _ in range(2 + i % 9)) for i in range(20000)]
    for s, f in enumerate(files):
        lines = []
        for d in range(docs_per_shard):
            n = int(rng.lognormvariate(5.6, 0.7))  # c4: ~400 words a document, long-tailed
            text = " ".join(rng.choices(vocab, k=max(5, n)))
            lines.append(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{s}/{d}"}))
        f.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=6))
    return [str(f) for f in files]


class CountingFile(io.RawIOBase):
    def __init__(self, path: str, counter: dict):
        self.f, self.counter = open(path, "rb", buffering=0), counter

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        self.counter["read"] += n or 0
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


class CountedLineFiles(ds.LineFiles):
    """``LineFiles`` whose files are opened through ``CountingFile``; counts documents and their bytes."""

    def __init__(self, files, global_batch):
        super().__init__(files, lambda r: r["text"], global_batch)
        self.counter = {"read": 0, "docs": 0, "parsed": 0}

    def read(self, piece, pos):
        file, start, end = self.pieces[piece]
        raw = io.BufferedReader(CountingFile(file, self.counter))
        f = gzip.GzipFile(fileobj=raw) if end is None else raw
        with f:
            if pos is not None:
                f.seek(pos)
            while True:
                at = f.tell()
                line = f.readline()
                if not line:
                    return
                self.counter["docs"] += 1
                self.counter["parsed"] += len(line)
                yield at, json.loads(line)["text"]


def tokenize(text: str) -> list[int]:
    return [1] + [zlib.crc32(w.encode()) % 128000 for w in text.split()] + [2]


def run_dp(files, dp_degree: int, global_batch: int, seq_len: int, steps: int) -> dict:
    ranks = []
    for r in range(dp_degree):
        pieces = CountedLineFiles(files, global_batch)
        order = ds.ShardOrder(pieces, tokenize, seq_len, global_batch, dp.lanes_of(global_batch, dp_degree, r))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            for lane in order.lanes:
                order.window(lane)
            times.append(time.perf_counter() - t0)
        c = pieces.counter
        ranks.append(
            {
                "rank": r,
                "bytes_read": c["read"],
                "bytes_parsed_uncompressed": c["parsed"],
                "docs_parsed_per_step": c["docs"] / steps,
                "s_per_batch": statistics.median(times),
                "pieces_opened": len(order.read_set()),
            }
        )
    total = sum(x["bytes_read"] for x in ranks)
    return {
        "dp": dp_degree,
        "total_bytes_read": total,
        "per_rank_bytes_read": {
            "mean": total / dp_degree,
            "max": max(x["bytes_read"] for x in ranks),
        },
        "bytes_read_per_uncompressed_byte_parsed": total / max(1, sum(x["bytes_parsed_uncompressed"] for x in ranks)),
        "docs_parsed_per_step_per_rank": statistics.mean(x["docs_parsed_per_step"] for x in ranks),
        "s_per_batch_per_rank": {
            "median": statistics.median(x["s_per_batch"] for x in ranks),
            "max": max(x["s_per_batch"] for x in ranks),
        },
        "first_ranks": ranks[:4],
    }


def rchar() -> int:
    """Bytes ``read`` calls returned to this process so far (the kernel's count, ``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no /proc/self/io")


def run_dp_datasets(files, dp_degree: int, global_batch: int, seq_len: int, steps: int) -> dict:
    """The same order through ``datasets``' streaming client (``StreamShards``: the path of c4 from the
    Hub, here over the local shards), bytes counted by the kernel for this process (``rchar``)."""
    from datasets import load_dataset

    stream = load_dataset("json", data_files=list(files), split="train", streaming=True)
    pieces = ds.StreamShards(stream, lambda r: r["text"], name="c4-local")
    per_rank, times = [], []
    for r in range(dp_degree):
        before = rchar()
        order = ds.ShardOrder(pieces, tokenize, seq_len, global_batch, dp.lanes_of(global_batch, dp_degree, r))
        for _ in range(steps):
            t0 = time.perf_counter()
            for lane in order.lanes:
                order.window(lane)
            times.append(time.perf_counter() - t0)
        per_rank.append(rchar() - before)
    return {
        "dp": dp_degree,
        "total_bytes_read": sum(per_rank),
        "per_rank_bytes_read": {"mean": sum(per_rank) / dp_degree, "max": max(per_rank)},
        "s_per_batch_per_rank": {"median": statistics.median(times), "max": max(times)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--corpus", default="/tmp/bench-c4")
    parser.add_argument("--docs-per-shard", type=int, default=60)
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dp", default="1,8,64,512")
    parser.add_argument("--datasets-dp", default="1,8,64", help="DP sizes through datasets' stream ('' skips)")
    parser.add_argument("--datasets-global-batch", type=int, default=128)
    parser.add_argument("--tag", default="data_scale")
    args = parser.parse_args()
    t0 = time.perf_counter()
    files = build_corpus(Path(args.corpus), args.docs_per_shard)
    corpus_bytes = sum(Path(f).stat().st_size for f in files)
    print(f"corpus: {len(files)} shards, {corpus_bytes / 1e6:.1f} MB gzipped ({time.perf_counter() - t0:.0f}s)")
    rows = []
    for m in [int(x) for x in args.dp.split(",") if x]:
        t = time.perf_counter()
        row = run_dp(files, m, args.global_batch, args.seq_len, args.steps)
        row["ratio_to_dp1"] = row["total_bytes_read"] / rows[0]["total_bytes_read"] if rows else 1.0
        rows.append(row)
        print(
            f"DP {m:4d}: all ranks read {row['total_bytes_read'] / 1e6:8.2f} MB ({row['ratio_to_dp1']:.3f}x DP 1), "
            f"per rank {row['per_rank_bytes_read']['mean'] / 1e6:.3f} MB, "
            f"{row['docs_parsed_per_step_per_rank']:.1f} docs parsed/step/rank, "
            f"{row['s_per_batch_per_rank']['median'] * 1e3:.1f} ms/batch/rank ({time.perf_counter() - t:.0f}s)"
        )
    ds_rows = []
    for m in [int(x) for x in args.datasets_dp.split(",") if x]:
        t = time.perf_counter()
        row = run_dp_datasets(files, m, args.datasets_global_batch, args.seq_len, args.steps)
        row["ratio_to_dp1"] = row["total_bytes_read"] / ds_rows[0]["total_bytes_read"] if ds_rows else 1.0
        ds_rows.append(row)
        print(
            f"through datasets' stream, DP {m:4d}: read {row['total_bytes_read'] / 1e6:8.2f} MB "
            f"({row['ratio_to_dp1']:.3f}x DP 1), per rank {row['per_rank_bytes_read']['mean'] / 1e6:.3f} MB, "
            f"{row['s_per_batch_per_rank']['median'] * 1e3:.1f} ms/batch/rank ({time.perf_counter() - t:.0f}s)"
        )
    result = {
        "bench": "data_scale",
        "date": date.today().isoformat(),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "corpus": {"shards": len(files), "gzipped_bytes": corpus_bytes, "docs_per_shard": args.docs_per_shard},
        "global_batch": args.global_batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "order": ds.FORMAT,
        "rows": rows,
        "through_datasets_stream": {"global_batch": args.datasets_global_batch, "rows": ds_rows},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['date']}-cpu-{args.tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
