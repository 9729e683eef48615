"""Tensor-parallel peers of a data-parallel rank read the corpus once between them, with real processes:
the launcher, torchrun, 4 CPU ranks over gloo, the debug model, a local streaming corpus of gzipped
JSON-lines shards (``training.data_peers``).

Counted from outside the ranks: ``strace -f`` follows the whole job and records every ``read`` /
``pread64`` of the corpus files (``-y`` names each call's file); the launcher's own sample of each file
(``inputs.data_files.check_content``, its main thread) is left out by its id. At TP 2 x FSDP 2 the ranks
together read what the ranks of FSDP 2 read for the same global batch and steps (within 1.1x); without
``training.data_peers`` every rank reads its data-parallel rank's share again (2x). A checkpoint of
the TP run resumes exactly: the steps after it log the uninterrupted run's losses.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, launcher_cmd, losses, pod_env

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")

STEPS, SHARDS, DOCS = 8, 16, 80
CALL = re.compile(r"^(\d+)\s+(.*)$")
RESULT = re.compile(r"\)\s+=\s+(\d+)$")


def corpus(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    files = []
    for s in range(SHARDS):
        lines = "".join(
            json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(150, 600))), "url": f"u{s}"})
            + "\n"
            for _ in range(DOCS)
        )
        path = folder / f"c4-train.{s:05d}-of-{SHARDS:05d}.json.gz"
        path.write_bytes(gzip.compress(lines.encode()))
        files.append(path)
    return files


def launch(tmp: Path, files: list[Path], name: str, ngpu: int, *more: str, trace: bool = True) -> tuple[str, dict]:
    """(the job's output, bytes of the corpus read by each thread of the ranks) of one launcher run."""
    args = [
        "--job.dump_folder",
        str(tmp / name),
        "--debug.seed",
        "1234",
        "--training.steps",
        str(STEPS),
        "--training.dataset_path",
        str(files[0].parent),
        "--data.streaming",
        "--training.global_batch_size",
        "8",
        "--training.local_batch_size",
        "4",
        "--checkpoint.interval",
        "4",
        *more,
    ]
    log = tmp / f"{name}.strace"
    cmd = launcher_cmd(*args)
    if trace:  # only the read calls stop the job (seccomp); -y names each call's file
        strace = ["strace", "--seccomp-bpf", "-f", "-qq", "-y", "-s", "0", "-e", "signal=none"]
        cmd = [*strace, "-e", "trace=read,pread64,readv,preadv,execve", "-o", str(log), *cmd]
    proc = subprocess.Popen(
        cmd, env=pod_env(NGPU=str(ngpu)), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out = proc.communicate(timeout=900)[0].decode(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    return out, corpus_reads(log, files[0].parent) if trace else {}


def corpus_reads(log: Path, folder: Path) -> dict[int, int]:
    """Bytes of the files in ``folder`` read by each thread but the launcher's main thread."""
    per_thread: Counter = Counter()  # strace -f names threads by their own id
    pending: set[int] = set()  # threads whose read of a corpus file strace split in two lines
    lines = log.read_text().splitlines()
    # the launcher: strace's own child, the first to exec (run_llama_train.sh, which execs the launcher)
    launcher = next(int(line.split()[0]) for line in lines if " execve(" in line)
    for line in lines:
        m = CALL.match(line)
        if not m:
            continue
        tid, rest = int(m.group(1)), m.group(2)
        if rest.startswith("<..."):
            ours = tid in pending
            pending.discard(tid)
        else:
            ours = f"<{folder}/" in rest
            if ours and rest.endswith("<unfinished ...>"):
                pending.add(tid)
                continue
        done = RESULT.search(rest)
        if ours and done and tid != launcher:  # the launcher samples each file in its main thread
            per_thread[tid] += int(done.group(1))
    return dict(per_thread)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peers")
    files = corpus(tmp / "c4")
    tp = launch(tmp, files, "tp", 4, "--parallelism.tensor_parallel_degree", "2")
    dp = launch(tmp, files, "dp", 2)  # FSDP 2: the same data-parallel size and global batch
    return tmp, files, tp, dp


def test_tp_peers_read_the_corpus_once_between_them(runs):
    _, files, (tp_out, tp_reads), (dp_out, dp_reads) = runs
    assert "tp=2" in tp_out and "dp_shard=2" in tp_out
    assert sorted(losses(tp_out)) == list(range(1, STEPS + 1)) == sorted(losses(dp_out))
    corpus_bytes = sum(f.stat().st_size for f in files)
    tp_total, dp_total = sum(tp_reads.values()), sum(dp_reads.values())
    assert dp_total < corpus_bytes  # a part of the corpus is consumed
    assert tp_total <= 1.1 * dp_total, f"TP 2 x FSDP 2 read {tp_total} bytes, FSDP 2 {dp_total}"
    print(
        f"\ncorpus {corpus_bytes} B; FSDP 2 read {dp_total} B {sorted(dp_reads.values())}; "
        f"TP 2 x FSDP 2 {tp_total} B {sorted(tp_reads.values())} ({tp_total / dp_total:.3f}x)"
    )


def test_a_tp_checkpoint_resumes_exactly(runs):
    tmp, files, (tp_out, _), _ = runs
    whole = losses(tp_out)
    checkpoint = tmp / "tp" / "checkpoint"
    shutil.rmtree(checkpoint / f"step-{STEPS}")  # the same job again: it resumes from step 4
    assert (checkpoint / "step-4").is_dir()
    out, _ = launch(tmp, files, "tp", 4, "--parallelism.tensor_parallel_degree", "2", trace=False)
    again = losses(out)
    assert sorted(again) == list(range(5, STEPS + 1)), out[-3000:]
    assert again == {s: whole[s] for s in again}
