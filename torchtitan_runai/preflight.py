"""``python -m torchtitan_runai.preflight``: fit and machine checks.

The manual: ``torchtitan_runai.launcher.preflight``.
"""

from torchtitan_runai.launcher.preflight import entry

if __name__ == "__main__":
    entry()
