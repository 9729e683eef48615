"""What torchrun runs on every rank: torchtitan's trainer with this fork's overlay.

Launch through run_llama_train.sh (pods) or `make train` (the CPU rehearsal), not directly.
"""

import sys

from torchtitan_runai.errors import cli
from torchtitan_runai.trainer import run

if __name__ == "__main__":
    cli(run, prog="train.py")
