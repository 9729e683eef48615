"""``python -m torchtitan_runai.stage``: stage the tokenizer and data onto a PVC.

The manual: ``torchtitan_runai.launcher.stage``.
"""

from torchtitan_runai.launcher.stage import entry

if __name__ == "__main__":
    entry()
