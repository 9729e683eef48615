"""torchtitan-runai: torchtitan 0.2.2 (from PyPI) plus what a Run:ai / Kubeflow job needs.

Importing the package is cheap (no torch); ``torchtitan_runai.upstream`` is the one module that
imports torchtitan internals (each name on first use), and ``torchtitan_runai.training.spec`` registers our
train specs.
"""

TRAIN_SPEC_NAME = "llama3_runai"
FUSED_TRAIN_SPEC_NAME = "llama3_runai_fused"  # the memory-saving fused output layer + loss
