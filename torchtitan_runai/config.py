"""Our config sections, and validation of the whole job config before any worker starts.

torchtitan 0.2.2 reads TOML into its ``JobConfig`` and merges in extra sections from
``job.custom_config_module``; that module is this one (``parse_job_config`` always passes it, so a
config file need not name it). The sections below are ours; everything else is torchtitan's schema.

``parse_job_config(args)`` is what both the launcher (once per pod, before torchrun) and every
rank use, so a config the launcher accepted is the config the ranks train with. It turns every
mistake into one ``UserError`` naming the setting, its value and the fix:

- the file: missing, unreadable, TOML syntax error (with its line);
- keys: unknown sections or keys (with the nearest valid name), values of the wrong type;
- values: seed outside [0, 2**32), steps or batch sizes not positive, seq_len not divisible by the
  tensor/context-parallel degree, parallel degrees that cannot tile the world size, unknown model
  flavor, global batch not divisible by local batch x data-parallel degree, and more
  (``validate``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import io
import types
import typing
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from torchtitan_runai import FUSED_TRAIN_SPEC_NAME, TRAIN_SPEC_NAME, upstream
from torchtitan_runai.errors import UserError
from torchtitan_runai.assets import Hub
from torchtitan_runai.data import Data
from torchtitan_runai.ckpt_perf import CheckpointPerf
from torchtitan_runai.export import Export
from torchtitan_runai.loss import Perf
from torchtitan_runai.resilience import Resilience
from torchtitan_runai.seed import check_seed

CUSTOM_CONFIG_MODULE = "torchtitan_runai.config"
MAX_SEQ_LEN = 131072  # Llama 3.1's trained context


@dataclass
class JobConfig:
    """The sections this fork adds to torchtitan's JobConfig (merged by torchtitan's ConfigManager)."""

    resilience: Resilience = field(default_factory=Resilience)
    """Preemption, hang detection and checkpoint-folder ownership (``torchtitan_runai.resilience``)."""

    hub: Hub = field(default_factory=Hub)
    """Where the tokenizer comes from on the Hugging Face Hub, and its cache (``torchtitan_runai.assets``)."""

    data: Data = field(default_factory=Data)
    """Local/PVC dataset format and streaming retries (``torchtitan_runai.data``)."""

    perf: Perf = field(default_factory=Perf)
    """Throughput/memory levers measured on the GPU (``torchtitan_runai.loss``, bench/)."""

    checkpoint_perf: CheckpointPerf = field(default_factory=CheckpointPerf)
    """Checkpoint-stall levers on top of torchtitan's [checkpoint] (``torchtitan_runai.ckpt_perf``)."""

    export: Export = field(default_factory=Export)
    """A Hugging Face copy of the model at the end of training (``torchtitan_runai.export``)."""


def _resolve_annotations(cls: type) -> None:
    # This module uses postponed annotations; torchtitan merges our fields into a class built in
    # another module, where the string "Resilience" cannot be resolved. Store the real types.
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        cls.__annotations__[f.name] = hints[f.name]


_resolve_annotations(JobConfig)


def _merged_config_class() -> type:
    return upstream.ConfigManager._merge_configs(upstream.JobConfig, JobConfig)


# ---------------------------------------------------------------------------------------------
# Reading the file


def config_file_from_args(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in ("--job.config_file", "--job.config-file"):
            if eq:
                return value
            return args[i + 1] if i + 1 < len(args) else None
    return None


def read_toml(path: str, setting: str = "CONFIG_FILE") -> dict[str, Any]:
    p = Path(path)
    fix = "point CONFIG_FILE at a TOML file that exists in the image or on the PVC, e.g. ./train_configs/llama3_8b.toml"
    if not p.exists():
        raise UserError(setting, path, "the config file does not exist", fix)
    if p.is_dir():
        raise UserError(setting, path, "is a directory, not a TOML file", fix)
    try:
        text = p.read_bytes()
    except OSError as e:
        raise UserError(setting, path, f"cannot be read ({e.strerror})", "make the file readable by the container's user")
    try:
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(setting, path, "is not UTF-8 text", "save the config as UTF-8 TOML")
    except tomllib.TOMLDecodeError as e:
        raise UserError(setting, path, f"TOML syntax error: {e}", "fix the TOML at that line")


# ---------------------------------------------------------------------------------------------
# Keys and types of the TOML, checked against the dataclass schema


def _type_ok(value: Any, annotation: Any) -> bool:
    if isinstance(annotation, str):  # unresolved forward reference: do not guess
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin in (list, tuple):
        if not isinstance(value, list):
            return False
        return not args or all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    text = str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", text)


def check_toml_schema(values: dict[str, Any], cls: type, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f"did you mean '{prefix}{near[0]}'?" if near else f"valid keys here: {', '.join(names)}"
            kind = "section" if isinstance(value, dict) else "key"
            raise UserError(dotted, None, f"unknown config {kind}", hint)
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise UserError(dotted, value, "must be a TOML table", f"write it as a [{dotted}] section")
            check_toml_schema(value, annotation, prefix=f"{dotted}.")
        elif not _type_ok(value, annotation):
            raise UserError(dotted, value, f"wrong type ({type(value).__name__})", f"use {_describe(annotation)}")


# ---------------------------------------------------------------------------------------------
# Parsing


def _flag_paths(cls: type, prefix: str = "") -> list[str]:
    """Every ``section.key`` (and ``section.sub.key`` for nested sections such as
    ``quantize.linear.float8``) that the command line accepts."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        annotation = hints.get(f.name, f.type)
        if dataclasses.is_dataclass(annotation):
            out += _flag_paths(annotation, f"{prefix}{f.name}.")
        elif prefix:
            out.append(f"{prefix}{f.name}")
    return out


def check_cli_flags(args: list[str], cls: type) -> None:
    """Unknown ``--section.key`` flags, with the nearest valid flag (tyro's own message is a wall)."""
    valid = set(_flag_paths(cls))
    for arg in args:
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            continue
        flag = arg[2:].split("=")[0].replace("-", "_")
        head, _, key = flag.rpartition(".")
        if key.startswith("no_"):
            key = key[3:]
        if f"{head}.{key}" in valid:
            continue
        near = difflib.get_close_matches(f"{head}.{key}", sorted(valid), n=1, cutoff=0.6)
        raise UserError("command line", arg, f"unknown flag --{flag}",
                        f"did you mean --{near[0]}?" if near else "run with --help for every valid flag")


def torchtitan_args(args: list[str]) -> list[str]:
    """The arguments torchtitan's ConfigManager gets: ours plus our custom config module."""
    if any(a.split("=")[0] in ("--job.custom_config_module", "--job.custom-config-module") for a in args):
        return list(args)
    return [*args, f"--job.custom_config_module={CUSTOM_CONFIG_MODULE}"]


def parse_job_config(args: list[str], world_size: int | None = None):
    """Parse TOML + command line exactly as the ranks will, then validate. Raises UserError."""
    toml_path = config_file_from_args(args)
    schema = _merged_config_class()
    if toml_path is not None:
        values = read_toml(toml_path)
        job = values.get("job", {})
        custom = job.get("custom_config_module") if isinstance(job, dict) else None
        if custom not in (None, "", CUSTOM_CONFIG_MODULE):
            raise UserError("job.custom_config_module", custom, "this fork's config sections live in its own module",
                            f"remove the key or set it to '{CUSTOM_CONFIG_MODULE}'")
        check_toml_schema(values, schema)
    check_cli_flags(args, schema)
    stderr = io.StringIO()
    try:
        with redirect_stderr(stderr):
            config = upstream.ConfigManager().parse_args(torchtitan_args(args))
    except SystemExit as e:
        message = " ".join(stderr.getvalue().split())
        if e.code in (0, None):  # --help
            print(stderr.getvalue(), end="")
            raise
        raise UserError("command line", " ".join(args), f"rejected by torchtitan's parser: {message[-600:]}",
                        "fix or remove that argument (run with --help for every valid flag)")
    except (ValueError, TypeError) as e:
        raise UserError("config", toml_path, str(e), "fix the config file")
    validate(config, world_size)
    return config


# ---------------------------------------------------------------------------------------------
# Semantic checks


def _positive(name: str, value: int, fix: str) -> None:
    if value <= 0:
        raise UserError(name, value, "must be positive", fix)


def _import_custom_module(config) -> None:
    """``experimental.custom_import`` may register train specs and flavors: torchtitan's Trainer
    imports it before it looks the model up, so the checks here must too."""
    module = getattr(getattr(config, "experimental", None), "custom_import", "")
    if not module:
        return
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise UserError("experimental.custom_import", module, f"cannot be imported ({e})",
                        "make the module importable from the working directory or PYTHONPATH, or remove the setting")


def _model_args(config):
    name, flavor = config.model.name, config.model.flavor
    if name in (TRAIN_SPEC_NAME, FUSED_TRAIN_SPEC_NAME):
        import torchtitan_runai.spec  # noqa: F401  registers it
    _import_custom_module(config)
    try:
        spec = upstream.get_train_spec(name)
    except ValueError:
        raise UserError("model.name", name, "no such train spec",
                        f"use '{TRAIN_SPEC_NAME}' (this fork's Llama 3.1 spec) or '{FUSED_TRAIN_SPEC_NAME}'")
    if flavor not in spec.model_args:
        raise UserError("model.flavor", flavor, f"not a flavor of {name}", "use one of " + ", ".join(spec.model_args))
    return spec.model_args[flavor]


def parallel_degrees(config) -> dict[str, int]:
    p = config.parallelism
    return {
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "data_parallel_shard_degree": p.data_parallel_shard_degree,
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
    }


def check_world_size(config, world_size: int) -> None:
    degrees = parallel_degrees(config)
    for name, value in degrees.items():
        if value == 0 or value < -1 or (value == -1 and name != "data_parallel_shard_degree"):
            raise UserError(f"parallelism.{name}", value, "invalid degree",
                            "use a positive integer (data_parallel_shard_degree may be -1: all remaining ranks)")
    fixed = 1
    for name, value in degrees.items():
        if value > 0:
            fixed *= value
    shard = degrees["data_parallel_shard_degree"]
    shown = ", ".join(f"{k}={v}" for k, v in degrees.items() if v != 1)
    if shard == -1:
        if world_size % fixed:
            raise UserError("parallelism", shown, f"the fixed degrees multiply to {fixed}, which does not divide the world size {world_size} (nodes x GPUs per node)",
                            f"choose degrees whose product divides {world_size}, or change the node/GPU count")
    elif fixed != world_size:
        raise UserError("parallelism", shown, f"the degrees multiply to {fixed} but the world size is {world_size} (nodes x GPUs per node)",
                        f"make the product equal {world_size}, or set data_parallel_shard_degree = -1")


def data_parallel_degree(config, world_size: int) -> int:
    p = config.parallelism
    others = p.tensor_parallel_degree * p.context_parallel_degree * p.pipeline_parallel_degree
    shard = p.data_parallel_shard_degree
    if shard == -1:
        shard = world_size // (others * p.data_parallel_replicate_degree)
    return shard * p.data_parallel_replicate_degree


def validate(config, world_size: int | None = None) -> None:
    t = config.training
    why = check_seed(config.debug.seed)
    if why:
        raise UserError("debug.seed", config.debug.seed, why, "pick a seed in [0, 4294967295] or remove debug.seed to draw one")
    _positive("training.steps", t.steps, "set training.steps to the number of optimizer steps to run (> 0)")
    _positive("training.local_batch_size", t.local_batch_size, "set a per-rank batch size >= 1")
    _positive("training.seq_len", t.seq_len, "set the sequence length in tokens (e.g. 8192)")
    if t.seq_len > MAX_SEQ_LEN:
        raise UserError("training.seq_len", t.seq_len, f"exceeds Llama 3.1's trained context of {MAX_SEQ_LEN} tokens",
                        f"use at most {MAX_SEQ_LEN}")
    p = config.parallelism
    tp, cp = p.tensor_parallel_degree, p.context_parallel_degree
    divisor = tp * (2 * cp if cp > 1 else 1)
    if divisor > 1 and t.seq_len % divisor:
        parts = f"tensor_parallel_degree={tp}" + (f" x 2 x context_parallel_degree={cp}" if cp > 1 else "")
        raise UserError("training.seq_len", t.seq_len, f"must be divisible by {divisor} ({parts})",
                        f"use a multiple of {divisor}, e.g. {(t.seq_len // divisor + 1) * divisor}")
    if config.metrics.log_freq <= 0:
        raise UserError("metrics.log_freq", config.metrics.log_freq, "must be positive", "log every N steps, e.g. 10")
    ck = config.checkpoint
    if ck.enable:
        _positive("checkpoint.interval", ck.interval, "save every N steps, e.g. 500")
        if ck.keep_latest_k < 0 or ck.keep_latest_k == 1:
            raise UserError("checkpoint.keep_latest_k", ck.keep_latest_k,
                            "must be 0 (keep all) or at least 2, so a damaged newest checkpoint has a fallback",
                            "use 2 or more")
    res = getattr(config, "resilience", None)
    if res is not None:
        if res.hang_timeout_seconds < 0:
            raise UserError("resilience.hang_timeout_seconds", res.hang_timeout_seconds, "must not be negative",
                            "use 0 (off) or a number of seconds above one step plus one checkpoint save, e.g. 600")
        if res.heartbeat_seconds <= 0:
            raise UserError("resilience.heartbeat_seconds", res.heartbeat_seconds, "must be positive", "use e.g. 2")
    if ck.enable and ck.async_mode not in ("disabled", "async", "async_with_pinned_mem"):
        raise UserError("checkpoint.async_mode", ck.async_mode, "unknown mode",
                        'use "disabled", "async" or "async_with_pinned_mem"')
    if ck.enable and ck.last_save_in_hf:
        raise UserError("checkpoint.last_save_in_hf", True,
                        "makes the final (and a preemption) checkpoint model-only, which cannot be resumed",
                        "remove it and set [export] at_end = true for a Hugging Face copy at the end")
    if config.lr_scheduler.warmup_steps < 0:
        raise UserError("lr_scheduler.warmup_steps", config.lr_scheduler.warmup_steps, "must not be negative", "use 0 or more")
    from torchtitan_runai import export, hf_import

    export.validate_export_config(config)
    fused_model = config.model.name == FUSED_TRAIN_SPEC_NAME
    if config.perf.loss == "fused" and not fused_model:
        raise UserError("perf.loss", "fused", "needs the model whose output layer feeds the loss",
                        f'set model.name = "{FUSED_TRAIN_SPEC_NAME}" or perf.loss = "plain"')
    if fused_model and (tp > 1 or p.pipeline_parallel_degree > 1):
        raise UserError("model.name", FUSED_TRAIN_SPEC_NAME, "the fused output layer supports FSDP/DDP only",
                        f'use model.name = "{TRAIN_SPEC_NAME}" with tensor or pipeline parallelism')
    if config.perf.loss_chunk_tokens <= 0:
        raise UserError("perf.loss_chunk_tokens", config.perf.loss_chunk_tokens, "must be positive", "use e.g. 8192")
    hf_import.validate_hf_import(config)
    args = _model_args(config)
    if tp > 1:
        for attr in ("n_heads", "n_kv_heads"):
            heads = getattr(args, attr, None) or args.n_heads
            if heads % tp:
                raise UserError("parallelism.tensor_parallel_degree", tp,
                                f"does not divide the model's {attr} ({heads})", "use a divisor of it, e.g. 8")
    if world_size is not None:
        check_world_size(config, world_size)
        dp = data_parallel_degree(config, world_size)
        gbs = t.global_batch_size
        if gbs > 0 and gbs % (t.local_batch_size * dp):
            raise UserError("training.global_batch_size", gbs,
                            f"must be a multiple of local_batch_size x data-parallel degree = {t.local_batch_size} x {dp}",
                            f"use a multiple of {t.local_batch_size * dp}, or -1")
