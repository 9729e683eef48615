"""One reader per data-parallel rank: its pipeline, context- and tensor-parallel peers receive its batches.

torchtitan builds the same dataloader on every rank of a data-parallel rank's group (the ranks that
differ only in their pipeline stage, context-parallel or tensor-parallel coordinate): each of them
reads, decodes and tokenizes the same batches, so a job at TP 2 reads its corpus twice, at TP 8 x PP 4
32 times. Here the first rank of the group reads (the loader of ``training.data``, made ahead on its
thread) and hands each batch to the others over a gloo group of the peers; the others read nothing
and build no loader.

Who is a peer
    torchtitan's data-loading mesh is ``("pp", "batch", "cp", "tp")`` unflattened from the world in
    that order (``ParallelDims.build_mesh``): world rank ``r`` has batch (data-parallel) coordinate
    ``(r // (cp * tp)) % batch``; its peers are the ranks with the same coordinate
    (``peer_groups``). The reader is the lowest of them (pipeline stage 0, CP and TP rank 0), so
    rank 0 is always a reader.

What goes to the peers, per batch (``Peers.send`` / ``Peers.receive``, on the training thread when
the Trainer asks for the next batch, every peer at the same point of its step)
    a small header (the reader's loader state after the batch, the shapes and dtypes), then the
    inputs and the labels as two tensor broadcasts. The end of a finite order and a failure of the
    reader go the same way, so the peers stop with it or fail naming it, never wait for a batch that
    does not come. The reader's own reading stays ahead of the step (``data_position.LaneLoader``);
    the hand-off is one small broadcast: measured in ``tests/integration/test_peer_reads.py``.

The checkpoint
    Every peer's ``state_dict`` is the reader's state after the last batch handed out, received with
    it: the same keys and values on every peer, and DCP writes each key once. Before its first batch
    a peer holds none (it saves and loads nothing: the reader's keys are the ones written and read).
    A resume at another tensor- or pipeline-parallel layout is refused anyway
    (``checkpoint.resume.plan_resume``), and the data position does not depend on it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Iterator

import torch

from torchtitan_runai.upstream import logger


def peer_groups(pp: int, batch: int, cp: int, tp: int) -> list[list[int]]:
    """The world ranks of each data-parallel rank's group, in data-parallel order; the first reads."""
    return [
        [((p * batch + b) * cp + c) * tp + t for p in range(pp) for c in range(cp) for t in range(tp)]
        for b in range(batch)
    ]


class Peers:
    """This rank's place among its data-parallel rank's peers: the gloo group, the reader's rank."""

    def __init__(self, group, ranks: list[int], rank: int):
        self.group, self.ranks, self.rank = group, ranks, rank
        self.reader = ranks[0]

    @property
    def reads(self) -> bool:
        return self.rank == self.reader

    def _header(self, header: Any) -> Any:
        import torch.distributed as dist

        box = [header]
        dist.broadcast_object_list(box, src=self.reader, group=self.group)
        return box[0]

    def _tensor(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.broadcast(tensor, src=self.reader, group=self.group)

    def send(self, batches: Iterator, state_of: Callable[[], Any]) -> Iterator:
        """The reader: each batch of ``batches`` handed to the peers with ``state_of()`` after it."""
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                self._header(("end",))
                return
            except BaseException as error:
                self._header(("failed", f"{type(error).__name__}: {error}"))
                raise
            inputs, labels = batch
            if set(inputs) != {"input"}:
                raise ValueError(f"a batch to hand to the peers has inputs {sorted(inputs)}, expected 'input'")
            x, y = inputs["input"].contiguous(), labels.contiguous()
            self._header(("batch", state_of(), tuple(x.shape), x.dtype, tuple(y.shape), y.dtype))
            self._tensor(x)
            self._tensor(y)
            yield {"input": x}, y

    def receive(self, keep_state: Callable[[Any], None]) -> Iterator:
        """A peer: the reader's batches; ``keep_state`` gets the reader's loader state after each."""
        while True:
            header = self._header(None)
            if header[0] == "end":
                return
            if header[0] == "failed":
                raise RuntimeError(f"rank {self.reader}, which reads this rank's data, failed: {header[1]}")
            _, state, x_shape, x_dtype, y_shape, y_dtype = header
            x, y = torch.empty(x_shape, dtype=x_dtype), torch.empty(y_shape, dtype=y_dtype)
            self._tensor(x)
            self._tensor(y)
            keep_state(state)
            yield {"input": x}, y


def build_peers(dp_world_size: int, dp_rank: int, parallelism: Any, timeout_s: float) -> Peers | None:
    """This rank's ``Peers`` (a gloo group per data-parallel rank, made by every rank together), or None
    when there are no peers (pipeline, context and tensor parallel degrees all 1) or no process group.

    Every rank of the job must call it at the same point (group creation is collective)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    pp = int(getattr(parallelism, "pipeline_parallel_degree", 1) or 1)
    cp = int(getattr(parallelism, "context_parallel_degree", 1) or 1)
    tp = int(getattr(parallelism, "tensor_parallel_degree", 1) or 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    if pp * cp * tp == 1:
        return None
    if pp * dp_world_size * cp * tp != world:
        logger.warning(
            f"data: pp {pp} x dp {dp_world_size} x cp {cp} x tp {tp} is not the world size {world}: "
            "every rank reads its own data"
        )
        return None
    groups = peer_groups(pp, dp_world_size, cp, tp)
    group, _ = dist.new_subgroups_by_enumeration(groups, timeout=timedelta(seconds=timeout_s), backend="gloo")
    mine = next(g for g in groups if rank in g)
    if groups.index(mine) != dp_rank:  # torchtitan's mesh is not laid out as peer_groups says
        raise RuntimeError(f"rank {rank} has data-parallel rank {dp_rank}; peer_groups says {groups.index(mine)}")
    return Peers(group, mine, rank)
