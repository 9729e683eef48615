"""The Trainer every rank runs: torchtitan's Trainer plus this fork's seams.

``run(argv)`` is the body of ``train.py``: pick the device (CUDA, else CPU/gloo), register our train
spec, parse and validate the config exactly as the launcher did, then build ``RunaiTrainer`` and
train. ``RunaiTrainer`` overrides torchtitan's documented methods only:

- ``init_distributed``: after the process group exists, agree on the run's 32-bit seed (rank 0 draws
  it when ``debug.seed`` is unset) and log ``seed: N``, so every run can be reproduced from its log.
"""

from __future__ import annotations

import torch

from torchtitan_runai import config as config_mod
from torchtitan_runai import device, seed, upstream

logger = upstream.logger


class RunaiTrainer(upstream.Trainer):
    def init_distributed(self):
        parallel_dims = super().init_distributed()
        debug = self.job_config.debug
        debug.seed = seed.agree_on_seed(debug.seed, self.device)
        logger.info(f"seed: {debug.seed}")
        return parallel_dims


def run(argv: list[str]) -> int:
    upstream.init_logger()
    device.select_device()
    import torchtitan_runai.spec  # noqa: F401  registers llama3_runai

    job_config = config_mod.parse_job_config(argv)
    trainer = RunaiTrainer(job_config)
    try:
        trainer.train()
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
