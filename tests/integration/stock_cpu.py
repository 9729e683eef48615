"""``--experimental.custom_import`` plug-in for stock torchtitan in the tests: the device/gloo shims
this package applies, and nothing else, so ``torchtitan.train`` (its own Trainer) runs on CPU ranks.

- ``training.device.select_device``: CUDA if present, else torchtitan's device globals on the CPU
  (which makes it pick gloo);
- spec ``llama3_stock_cpu``: torchtitan's own ``llama3`` spec (model, loss, tokenizer, dataloader,
  metrics) whose parallelize step also tells FSDP to reduce by SUM on gloo (``training.spec.
  parallelize``; gloo has no AVG). The checkpoint it writes is stock llama3's.
"""

import dataclasses

from torchtitan_runai import upstream
from torchtitan_runai.training import device, spec

SPEC = "llama3_stock_cpu"

device.select_device()
try:
    upstream.get_train_spec(SPEC)
except ValueError:
    upstream.register_train_spec(
        SPEC, dataclasses.replace(upstream.llama3.get_train_spec(), parallelize_fn=spec.parallelize)
    )
