"""The 32-bit seed policy.

Every run trains with a seed in ``[0, 2**32)``: stock torchtitan 0.2.2 broadcasts a 64-bit seed from
rank 0's RNG state, which overflows ``manual_seed`` on some systems (the original example project's first patch)
and is only logged at DEBUG level, so an unseeded run could not be reproduced from its log.

- ``debug.seed`` set: it must lie in the range (checked before any worker starts).
- ``debug.seed`` unset, a fresh job: rank 0 draws one 32-bit seed, broadcasts it, and every rank logs
  ``seed: N``; rerun with ``--debug.seed N`` to reproduce.

A job's seed is fixed once it has a checkpoint: "fixed by default" here means *drawn once per job,
then stored*, not a constant default (a constant would make every unseeded job in a team the same
run; a drawn one is still reproducible from its log). Every checkpoint's marker keeps the seed the
job trains with (``checkpoint.resume.settings_of``, "settings"), and every resume reuses it
(``checkpoint.resume.reuse_seed``, before validation, so ``agree_on_seed`` gets it as configured):
an unset ``debug.seed`` takes the stored one, another value is replaced by it, and the launcher says
so in one line. A resumed rank also continues its own RNG state from the checkpoint, so the seed
of a resumed job only matters for what it seeds before loading.

Pipeline parallelism adds the PP rank to the seed (torchtitan's ``set_determinism``), so drawn
seeds leave headroom below 2**32 for that offset.
"""

from __future__ import annotations

import secrets

SEED_LIMIT = 2**32
_PP_HEADROOM = 2**16


def check_seed(seed: object) -> str | None:
    """Return why ``seed`` is not a valid configured seed, or None if it is fine."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        return f"must be an integer, got {type(seed).__name__}"
    if not 0 <= seed < SEED_LIMIT:
        return f"must lie in [0, 2**32) = [0, {SEED_LIMIT - 1}]"
    return None


def draw_seed() -> int:
    return secrets.randbelow(SEED_LIMIT - _PP_HEADROOM)


def agree_on_seed(configured: int | None, device) -> int:
    """The run's seed: the configured one, or rank 0's fresh draw shared with every rank."""
    import torch
    import torch.distributed as dist

    if configured is not None:
        return configured
    if not (dist.is_available() and dist.is_initialized()):
        return draw_seed()
    seed = torch.tensor([draw_seed() if dist.get_rank() == 0 else 0], dtype=torch.int64, device=device)
    dist.broadcast(seed, src=0)
    return int(seed.item())
