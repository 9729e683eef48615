"""The one seam to torchtitan's internals.

Every import of ``torchtitan.*`` in this project goes through this module, so a torchtitan upgrade
has one place to look. Importing it checks that the installed torchtitan is exactly the version we
were written against (``EXPECTED_TORCHTITAN``) and fails with one clear line otherwise: 0.3 removed
the TOML configs and the train-spec registry this fork is built on.

Where torchtitan offers no extension point (the CPU device choice, which it makes at import time),
the adjustment is made here, in a named function, and nowhere else.
"""

from __future__ import annotations

from importlib import metadata

from torchtitan_runai.errors import UserError

EXPECTED_TORCHTITAN = "0.2.2"


def installed_torchtitan_version() -> str | None:
    try:
        return metadata.version("torchtitan")
    except metadata.PackageNotFoundError:
        return None


def check_torchtitan_version(found: str | None = None) -> None:
    found = installed_torchtitan_version() if found is None else found
    if found != EXPECTED_TORCHTITAN:
        raise UserError(
            "torchtitan",
            found or "not installed",
            f"torchtitan-runai is built on torchtitan=={EXPECTED_TORCHTITAN} exactly",
            f"pip install 'torchtitan=={EXPECTED_TORCHTITAN}' (see pyproject.toml); "
            "0.3 removed TOML configs and the train-spec registry",
        )


check_torchtitan_version()

# ruff: noqa: E402  (the version check must run before torchtitan is imported)
import torchtitan.tools.utils as _tt_utils
from torchtitan.components import metrics as _tt_metrics
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import IGNORE_INDEX, build_cross_entropy_loss
from torchtitan.components.metrics import DeviceMemStats, MetricsProcessor, build_metrics_processor
from torchtitan.config import ConfigManager, JobConfig
from torchtitan.config import job_config as config_sections
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed import parallel_dims as _tt_parallel_dims
from torchtitan.models import llama3
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.train_spec import TrainSpec, get_train_spec, register_train_spec
from torchtitan.tools import profiling as _tt_profiling
from torchtitan.tools.logging import init_logger, logger
from torchtitan.train import Trainer, main as torchtitan_main
from torchtitan.components.dataloader import BaseDataLoader, ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer, HuggingFaceTokenizer
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets import text_datasets
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset
from torchtitan.tools.utils import Color, NoColor

__all__ = [
    "EXPECTED_TORCHTITAN",
    "CheckpointManager",
    "ConfigManager",
    "DeviceMemStats",
    "IGNORE_INDEX",
    "JobConfig",
    "Llama3StateDictAdapter",
    "MetricsProcessor",
    "ParallelDims",
    "TrainSpec",
    "Trainer",
    "build_cross_entropy_loss",
    "build_metrics_processor",
    "config_sections",
    "dist_utils",
    "get_train_spec",
    "init_logger",
    "llama3",
    "logger",
    "register_train_spec",
    "torchtitan_main",
    "use_cpu_device",
    "BaseDataLoader",
    "BaseTokenizer",
    "DatasetConfig",
    "HuggingFaceTextDataset",
    "HuggingFaceTokenizer",
    "ParallelAwareDataloader",
    "text_datasets",
    "Color",
    "NoColor",
]

# torchtitan picks its device at import time as "the available accelerator, else cuda" and copies
# the choice into these modules' globals; on a machine without a GPU we point them all at the CPU.
_DEVICE_GLOBAL_HOLDERS = (_tt_utils, _tt_metrics, _tt_parallel_dims, dist_utils, _tt_profiling)


class _CpuDeviceModule:
    """torch.cpu, except that current_device() is an index: torchtitan passes it as a device id."""

    def __getattr__(self, name):
        import torch

        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        return 0


def use_cpu_device(build_memory_monitor) -> None:
    """Make torchtitan use the CPU device (and therefore the gloo backend) in this process.

    ``build_memory_monitor`` replaces torchtitan's CUDA memory monitor, whose constructor calls
    CUDA-only APIs; the metrics processor looks it up as a module global when it is built.
    """
    for module in _DEVICE_GLOBAL_HOLDERS:
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = _CpuDeviceModule()
    _tt_metrics.build_device_memory_monitor = build_memory_monitor
