"""``python -m torchtitan_runai.manifest``: Run:ai commands and Kubeflow specs.

The manual: ``torchtitan_runai.launcher.manifest``.
"""

from torchtitan_runai.launcher.manifest import entry

if __name__ == "__main__":
    entry()
