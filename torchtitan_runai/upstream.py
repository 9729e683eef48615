"""The one seam to torchtitan's internals.

Every import of ``torchtitan.*`` in this project goes through this module, so a torchtitan upgrade
has one place to look. Importing it checks that the installed torchtitan is exactly the version we
were written against (``EXPECTED_TORCHTITAN``) and fails with one clear line otherwise: 0.3 removed
the TOML configs and the train-spec registry this fork is built on.

Each exported name (``__all__``) is imported on first use (PEP 562 ``__getattr__``; ``_EXPORTS``
says from where), not when this module is imported: the launcher validates a config with
torchtitan's config classes alone (``torchtitan.config``, ``torchtitan.tools.logging``,
``torchtitan.components.tokenizer``: ``_LIGHT_MODULES``) and leaves the rest (models, compiler,
datasets: 14 s of the launcher's time on an H200 host with eager imports) to the ranks, which
import it anyway. torchtitan's package ``__init__`` imports its quantization converters, and through them
``models.attention`` and ``torch._inductor``, before anything else; it is therefore deferred too,
and runs (``load_torchtitan``) before the first module outside ``_LIGHT_MODULES`` is imported, so
the ranks import torchtitan in its own order. ``llama3_flavors`` and ``text_dataset_paths`` read
torchtitan's Llama 3 flavor table and its named datasets from its source, without importing the
model code or ``datasets`` (tested equal to the imported tables; None, and the caller imports,
when the source is not the shape they know).

Where torchtitan offers no extension point (the CPU device choice, which it makes at import time),
the adjustment is made here, in a named function, and nowhere else.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import importlib
import importlib.util
import sys
import threading
import types
from importlib import metadata
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------------------------------
# torchtitan's package, initialised on first need

_LIGHT_MODULES = frozenset(
    {
        "torchtitan.config",
        "torchtitan.config.job_config",
        "torchtitan.config.manager",
        "torchtitan.tools.logging",
        "torchtitan.components.tokenizer",
    }
)
"""The modules config validation needs. They import torch, tyro and tokenizers but nothing of
torchtitan outside this set, so they may run before torchtitan's package ``__init__``."""

_init_lock = threading.RLock()


def _defer_package_init() -> None:
    """Put torchtitan's package in ``sys.modules`` with its ``__path__`` but without running its
    ``__init__`` yet, so that ``_LIGHT_MODULES`` import without the quantization → attention →
    torch._inductor chain."""
    if "torchtitan" not in sys.modules:  # else imported already (by a user's module, say): nothing to defer
        sys.modules["torchtitan"] = importlib.util.module_from_spec(importlib.util.find_spec("torchtitan"))


def load_torchtitan() -> None:
    """Run torchtitan's package ``__init__`` (its quantization converters registered, ``__version__``
    set, which marks it done) unless it has run. Called before any import outside
    ``_LIGHT_MODULES``, and before a user's ``experimental.custom_import`` module (which may
    import torchtitan itself)."""
    with _init_lock:
        package = sys.modules["torchtitan"]
        if not hasattr(package, "__version__"):
            package.__spec__.loader.exec_module(package)


_defer_package_init()

_EXPORTS: dict[str, tuple[str, str | None]] = {
    # name: (torchtitan module, attribute; None: the module itself)
    "CheckpointManager": ("torchtitan.components.checkpoint", "CheckpointManager"),
    "ConfigManager": ("torchtitan.config", "ConfigManager"),
    "DeviceMemStats": ("torchtitan.components.metrics", "DeviceMemStats"),
    "IGNORE_INDEX": ("torchtitan.components.loss", "IGNORE_INDEX"),
    "JobConfig": ("torchtitan.config", "JobConfig"),
    "Llama3StateDictAdapter": ("torchtitan.models.llama3.model.state_dict_adapter", "Llama3StateDictAdapter"),
    "MetricsProcessor": ("torchtitan.components.metrics", "MetricsProcessor"),
    "ParallelDims": ("torchtitan.distributed", "ParallelDims"),
    "TrainSpec": ("torchtitan.protocols.train_spec", "TrainSpec"),
    "Trainer": ("torchtitan.train", "Trainer"),
    "cross_entropy_loss": ("torchtitan.components.loss", "cross_entropy_loss"),
    "dist_utils": ("torchtitan.distributed.utils", None),
    "get_train_spec": ("torchtitan.protocols.train_spec", "get_train_spec"),
    "init_logger": ("torchtitan.tools.logging", "init_logger"),
    "llama3": ("torchtitan.models.llama3", None),
    "logger": ("torchtitan.tools.logging", "logger"),
    "register_train_spec": ("torchtitan.protocols.train_spec", "register_train_spec"),
    "torchtitan_main": ("torchtitan.train", "main"),
    "BaseDataLoader": ("torchtitan.components.dataloader", "BaseDataLoader"),
    "BaseTokenizer": ("torchtitan.components.tokenizer", "BaseTokenizer"),
    "DatasetConfig": ("torchtitan.hf_datasets", "DatasetConfig"),
    "HuggingFaceTextDataset": ("torchtitan.hf_datasets.text_datasets", "HuggingFaceTextDataset"),
    "HuggingFaceTokenizer": ("torchtitan.components.tokenizer", "HuggingFaceTokenizer"),
    "ParallelAwareDataloader": ("torchtitan.components.dataloader", "ParallelAwareDataloader"),
    "text_datasets": ("torchtitan.hf_datasets.text_datasets", None),
    "Color": ("torchtitan.tools.utils", "Color"),
    "NoColor": ("torchtitan.tools.utils", "NoColor"),
    # the modules holding torchtitan's device choice (use_cpu_device)
    "_tt_utils": ("torchtitan.tools.utils", None),
    "_tt_metrics": ("torchtitan.components.metrics", None),
    "_tt_parallel_dims": ("torchtitan.distributed.parallel_dims", None),
    "_tt_profiling": ("torchtitan.tools.profiling", None),
}


def _import(module: str) -> types.ModuleType:
    if module not in _LIGHT_MODULES:
        load_torchtitan()
    return importlib.import_module(module)


def __getattr__(name: str) -> Any:
    """An exported name, imported on first use (PEP 562), then cached as a module global."""
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = _import(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def _export(name: str) -> Any:
    return globals()[name] if name in globals() else __getattr__(name)


__all__ = [
    "EXPECTED_TORCHTITAN",
    "check_torchtitan_version",
    "installed_torchtitan_version",
    "llama3_flavors",
    "load_torchtitan",
    "use_cpu_device",
    *(name for name in _EXPORTS if not name.startswith("_")),
]


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


# ---------------------------------------------------------------------------------------------
# torchtitan's tables that validation reads (Llama 3 flavors, named datasets), without their modules


class _Unreadable(Exception):
    """The source is not the shape the reader knows: callers import the real table instead."""


_REQUIRED = object()  # a field without a default


@dataclasses.dataclass(frozen=True)
class _Factory:
    """A ``field(default_factory=<class read from the same source>)`` default."""

    cls: str


def _construct(node: ast.AST, classes: dict[str, dict[str, Any]]) -> Any:
    """The value of a literal, or of ``Cls(key=value, ...)`` for a dataclass read from source."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in classes:
        if node.args or any(k.arg is None for k in node.keywords):
            raise _Unreadable(ast.unparse(node))
        return _instance(node.func.id, {k.arg: _construct(k.value, classes) for k in node.keywords}, classes)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise _Unreadable(ast.unparse(node)) from None


def _instance(cls: str, given: dict[str, Any], classes: dict[str, dict[str, Any]]) -> types.SimpleNamespace:
    fields = classes[cls]
    if set(given) - set(fields):
        raise _Unreadable(f"{cls} has no fields {sorted(set(given) - set(fields))}")
    values = {**fields, **given}
    if any(v is _REQUIRED for v in values.values()):
        raise _Unreadable(f"{cls}: a field without a default is not given")
    return types.SimpleNamespace(
        **{k: _instance(v.cls, {}, classes) if isinstance(v, _Factory) else v for k, v in values.items()}
    )


def _dataclass_fields(tree: ast.Module, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each named class's annotated fields and their defaults (a class's factories listed after it)."""
    bodies = {node.name: node.body for node in tree.body if isinstance(node, ast.ClassDef) and node.name in names}
    if set(bodies) != set(names):
        raise _Unreadable(f"classes {sorted(set(names) - set(bodies))} not found")
    classes: dict[str, dict[str, Any]] = {}
    for name in reversed(names):
        fields: dict[str, Any] = {}
        for item in bodies[name]:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            value = item.value
            if value is None:
                fields[item.target.id] = _REQUIRED
            elif isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
                factory = {k.arg: k.value for k in value.keywords}
                if (
                    set(factory) != {"default_factory"}
                    or getattr(factory["default_factory"], "id", None) not in classes
                ):
                    raise _Unreadable(ast.unparse(value))
                fields[item.target.id] = _Factory(factory["default_factory"].id)
            else:
                fields[item.target.id] = _construct(value, classes)
        classes[name] = fields
    return classes


def _table_entries(source: Path, table: str, cls: str) -> list[tuple[str, ast.Call]]:
    """``table = {"key": cls(...), ...}`` at the top level of ``source``: its keys and calls."""
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [table]:
            if not isinstance(node.value, ast.Dict) or None in node.value.keys:
                raise _Unreadable(f"{table} is not a dict literal")
            entries = []
            for key, value in zip(node.value.keys, node.value.values):
                if not (isinstance(value, ast.Call) and getattr(value.func, "id", None) == cls):
                    raise _Unreadable(f"{table}[{ast.unparse(key)}] is not {cls}(...)")
                entries.append((ast.literal_eval(key), value))
            return entries
    raise _Unreadable(f"{table} not found in {source}")


def read_llama3_flavors(root: Path) -> dict[str, types.SimpleNamespace]:
    """The Llama 3 flavor table of the torchtitan package at ``root``, read from its source (raises
    ``_Unreadable`` when it is not a table of ``TransformerModelArgs(key=literal, ...)``)."""
    classes = _dataclass_fields(
        ast.parse((root / "models/llama3/model/args.py").read_text()), ("TransformerModelArgs", "RoPEScalingArgs")
    )
    entries = _table_entries(root / "models/llama3/__init__.py", "llama3_args", "TransformerModelArgs")
    return {name: _construct(call, classes) for name, call in entries}


def read_text_dataset_paths(root: Path) -> dict[str, str]:
    """torchtitan's named datasets (``hf_datasets.text_datasets.DATASETS``) and their paths, read
    from the source of the package at ``root``."""
    paths = {}
    for name, call in _table_entries(root / "hf_datasets/text_datasets.py", "DATASETS", "DatasetConfig"):
        path = [k.value for k in call.keywords if k.arg == "path"]
        if len(path) != 1:
            raise _Unreadable(f"DATASETS[{name!r}] has no path=")
        paths[name] = _construct(path[0], {})
    return paths


@functools.cache
def _read(reader: Any) -> Any:
    try:
        return reader(Path(sys.modules["torchtitan"].__path__[0]))
    except (_Unreadable, OSError, SyntaxError, ValueError):
        return None


def llama3_flavors() -> dict[str, types.SimpleNamespace] | None:
    """``torchtitan.models.llama3.llama3_args`` without importing it (the model code, the
    compiler, the datasets): each flavor's fields as attributes (``TransformerModelArgs``' field
    values: dim, n_heads, rope_scaling_args.scaling_factor, ...), a new copy per call. None when
    the source is not the shape this reader knows; the caller then imports the real table."""
    return copy.deepcopy(_read(read_llama3_flavors))


def text_dataset_paths() -> dict[str, str] | None:
    """``{name: path}`` of ``torchtitan.hf_datasets.text_datasets.DATASETS`` without importing it
    (``datasets``, pandas, the rest of torchtitan). None when the source is not the shape this reader
    knows; the caller then imports the real table."""
    found = _read(read_text_dataset_paths)
    return None if found is None else dict(found)


# ---------------------------------------------------------------------------------------------
# The CPU device

# torchtitan picks its device at import time as "the available accelerator, else cuda" and copies
# the choice into these modules' globals; on a machine without a GPU we point them all at the CPU.
_DEVICE_GLOBAL_HOLDERS = ("_tt_utils", "_tt_metrics", "_tt_parallel_dims", "dist_utils", "_tt_profiling")


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
    for module in map(_export, _DEVICE_GLOBAL_HOLDERS):
        if hasattr(module, "device_type"):
            module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = _CpuDeviceModule()
    _export("_tt_metrics").build_device_memory_monitor = build_memory_monitor
