"""The pod's launcher, ``run_llama_train.sh``'s command: the manual is ``torchtitan_runai.launcher.launch``."""

from torchtitan_runai.launcher.launch import entry

if __name__ == "__main__":
    entry()
