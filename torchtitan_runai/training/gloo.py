"""Creating the gloo process group so that it survives torchrun restarts.

``init_gloo``: creating a gloo process group right after a torchrun restart fails often on torch
2.13 (``Gloo connectFullMesh failed ... Connection refused``). All ranks retry together under a
fresh store prefix per attempt.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta


def init_gloo(timeout_s: float, attempts: int = 5) -> None:
    """init_process_group("gloo") with retries, each attempt under a fresh store prefix.

    Every rank must take the same number of attempts: after each one, the ranks publish success or
    failure to the store and retry unless all succeeded.
    """
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=timeout_s)))
    last_error = None
    for attempt in range(attempts):
        prefix = f"runai/restart{restart}/pg{attempt}"
        sub = dist.PrefixStore(prefix, store)
        ok = True
        try:
            dist.init_process_group(
                "gloo",
                store=dist.PrefixStore("pg", sub),
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=timeout_s),
            )
            dist.barrier()
        except Exception as e:  # gloo raises RuntimeError/DistBackendError: retry all of them
            ok, last_error = False, e
        sub.set(f"result/{rank}", b"1" if ok else b"0")
        sub.wait([f"result/{r}" for r in range(world)], timedelta(seconds=timeout_s))
        results = sub.multi_get([f"result/{r}" for r in range(world)])
        if all(r == b"1" for r in results):
            if attempt:
                print(
                    f"[resilience] rank {rank}: process group ready on attempt {attempt + 1}",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if dist.is_initialized():
            dist.destroy_process_group()
        print(
            f"[resilience] rank {rank}: process group attempt {attempt + 1} failed "
            f"({type(last_error).__name__ if last_error else 'a peer failed'}); retrying",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(0.5 + 0.5 * attempt)
    raise RuntimeError(f"could not create the gloo process group in {attempts} attempts: {last_error}")
