"""What torchrun runs on every rank: torchtitan's trainer with this fork's overlay.

Launch through run_llama_train.sh (pods) or `make train` (the CPU rehearsal), not directly.
"""

from torchtitan_runai.errors import cli

if __name__ == "__main__":
    # Imported here, not at module level: DCP's checkpoint-writing process is a ``spawn`` child that
    # re-imports this file, and needs torch, not torchtitan (13 s cold on a GPU host).
    from torchtitan_runai.training.trainer import run

    cli(run, prog="train.py")
