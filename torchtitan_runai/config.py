"""Our config sections, and parsing and value validation of the job config.

torchtitan 0.2.2 reads TOML into its ``JobConfig`` and merges in extra sections from
``job.custom_config_module``; that module is this one (``parse_config`` always passes it, so a
config file need not name it). The sections below are ours (one dataclass per section, read by the
feature it configures); everything else is torchtitan's schema. This module is a base layer: it
imports no feature, so every feature may import its section from here.

``parse_config(args)`` reads and checks the file, the flags and the values. The checks that need
the model (train spec and flavor, head counts, a Hugging Face initial load) sit above it, in
``torchtitan_runai.job.parse_job_config``: that is what the launcher (once per pod, before
torchrun), every rank and every command use, so a config the launcher accepted is the config the
ranks train with. Every mistake is one ``UserError`` naming the setting, its value and the fix:

- the file: missing, unreadable, TOML syntax error (with its line);
- keys: unknown sections or keys (with the nearest valid name), values of the wrong type;
- values: seed outside [0, 2**32), steps or batch sizes not positive, optimizer numbers (a learning
  rate or eps not positive, a negative weight decay, betas outside [0, 1)), a schedule longer in
  warmup than in steps or with decay_ratio / min_lr_factor outside [0, 1], seq_len not divisible by the
  tensor/context-parallel degree, parallel degrees that cannot tile the world size, global batch
  not divisible by local batch x data-parallel degree, [export] without checkpoints, and more
  (``validate``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import math
import re
import tempfile
import types
import typing
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from torchtitan_runai import FUSED_TRAIN_SPEC_NAME, TRAIN_SPEC_NAME, upstream
from torchtitan_runai.errors import UserError
from torchtitan_runai.seed import check_seed

CUSTOM_CONFIG_MODULE = "torchtitan_runai.config"
MAX_SEQ_LEN = 131072  # Llama 3.1's trained context
LOSS_CHUNK_TOKENS = 8192
"""Default tokens per chunk of the chunked and fused losses (``[perf] loss_chunk_tokens``)."""
EXPORT_DTYPES = ("bfloat16", "float16", "float32")
PINNED_MODE = "async_with_pinned_mem"
"""``checkpoint.async_mode`` that stages through pinned host memory (``training.checkpoint.staging``)."""
"""Weight dtypes a Hugging Face export can write (``[export] dtype``, ``export --dtype``)."""


# ---------------------------------------------------------------------------------------------
# The sections (one dataclass per section; the features read them, this module validates them)


@dataclass
class Resilience:
    """Preemption, hang detection and checkpoint-folder ownership ([resilience] in the TOML)."""

    hang_timeout_seconds: int = 300
    """Seconds without a finished training step (or checkpoint save) before a rank declares the job
    hung, names the stuck rank(s) and exits so that torchrun/Kubernetes restart it. Armed after the
    first step (compilation and loading are not counted). Must exceed one step plus one
    checkpoint save; 0 disables the watchdog."""

    heartbeat_seconds: float = 2.0
    """How often each rank publishes its heartbeat to the rendezvous store."""

    take_over_folder: bool = False
    """Use a checkpoint folder that another job (a different JOB_UUID/JOB_NAME) owns, and make this
    job its owner. Only for deliberately continuing another job's run."""


@dataclass
class Hub:
    """Where the tokenizer comes from when ``model.hf_assets_path`` lacks it ([hub] section)."""

    repo_id: str = ""
    """Hub repository of the tokenizer, e.g. "meta-llama/Llama-3.1-8B". Empty: never download;
    model.hf_assets_path must then hold the tokenizer."""

    revision: str = "main"
    """Branch, tag or commit of repo_id. Pin a commit for reproducible runs."""

    cache_dir: str = ""
    """Download cache (shared by all ranks; put it on the PVC). Empty: $HF_HUB_CACHE, else
    $HF_HOME/hub, else <job.dump_folder>/hf_cache."""

    files: list[str] = field(
        default_factory=lambda: [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "original/tokenizer.model",
        ]
    )
    """Tokenizer files to fetch from repo_id (nothing else is downloaded). Files the repo lacks are
    skipped, as long as tokenizer.json or original/tokenizer.model arrives."""

    tokenizer_format: str = "auto"
    """"auto" (tokenizer.json if present, else tiktoken), "hf" or "tiktoken"."""

    allow_download: bool = True
    """False: use the cache only, as HF_HUB_OFFLINE=1 does."""

    retries: int = 5
    """Extra attempts after a rate limit (429), a Hub error (5xx) or a connection failure."""

    backoff_s: float = 2.0
    """First wait between attempts; doubled each time, capped at max_backoff_s."""

    max_backoff_s: float = 60.0
    """Longest single wait between attempts."""

    lock_timeout_s: float = 1800.0
    """How long a process waits for another one's download before giving up."""


@dataclass
class Data:
    """How training text is read ([data] section)."""

    text_column: str = "text"
    """Column (JSON key) holding the text of a sample in local datasets."""

    format: str = "auto"
    """Local file format: "auto" (from the file suffix), "jsonl", "json", "parquet", "arrow", "text"."""

    streaming: bool = False
    """Stream local files instead of loading them map-style (for corpora too big to convert)."""

    text_sample_by: str = "paragraph"
    """Plain text only: one sample per "line", "paragraph" (blank-line separated) or "document"."""

    cache_dir: str = ""
    """Where `datasets` keeps its Arrow conversion of local files. Empty: its default
    ($HF_DATASETS_CACHE or ~/.cache/huggingface/datasets)."""

    retries: int = 5
    """Extra attempts when the Hub stream fails with 429 / 5xx / a dropped connection."""

    backoff_s: float = 1.0
    """First wait between attempts; doubled each time, capped at max_backoff_s."""

    max_backoff_s: float = 16.0
    """Longest single wait between attempts."""

    stage_c4_shards: int = 8
    """How many allenai/c4 "en" train shards (~320 MB each) the stage command copies to the PVC."""

    order: str = "global"
    """Training order: "global" (one order for the whole job, independent of the number of ranks,
    so a run resumes on another node count: ``training.data_position``) or "per-rank" (torchtitan's
    own per-rank shares; resumes at the same data-parallel size only). A checkpoint written with
    per-rank state (or before the global order existed) continues per-rank."""


@dataclass
class Perf:
    """Throughput settings of this fork (TOML section ``[perf]``)."""

    loss: Literal["plain", "chunked", "fused"] = "plain"
    """Cross-entropy implementation. 'plain' (default) is stock torchtitan's loss; with
    torch.compile it is already fused (no fp32 logits) and it was the fastest on the H100 proxy
    (bench/results/2026-11-25-*: 'fused' costs 1-2% tok/s). 'fused' never materialises the
    [tokens, vocab] logits or their gradient: it frees ~1.5-2 GiB of peak memory per 8k-token
    sequence (4-8 GiB at local batch 3-4), so choose it only where memory, not speed, binds (a
    batch or AC setting that otherwise OOMs). Needs the model class FusedHeadTransformer.
    'chunked' keeps the logits but never their fp32 copy (for runs without torch.compile)."""

    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS
    """Tokens per chunk for 'fused' and 'chunked'. One chunk's logits cost
    chunk_tokens x vocab x 2 bytes (2 GiB at 8192 x 128256 in bf16); smaller chunks save memory,
    larger ones keep the output matmuls big. 8192 measured as good on H100."""


@dataclass
class CheckpointPerf:
    """``[checkpoint_perf]``: this fork's checkpoint-stall levers (on top of torchtitan's ``[checkpoint]``)."""

    reuse_staging: bool = True
    """With ``checkpoint.async_mode = "async_with_pinned_mem"``: stage through ``build_stager`` (pinned
    buffers kept across checkpoints; works around torch 2.11's per-save close,
    ``torchtitan_runai.training.checkpoint.staging``)."""

    prepare_at_start: bool = True
    """With ``reuse_staging``: create, fault in and pin the staging memory on a background thread
    while the trainer loads and compiles, so the first checkpoint costs what the later ones do
    (8B proxy, one H100: 27.8 s for stock's first -> 0.41 s). The shared memory (checkpoint size /
    GPUs, per GPU) is then held from the start instead of from the first checkpoint on."""

    writer_threads: int = 16
    """Threads that write each rank's checkpoint files (DCP's ``FileSystemWriter.thread_count``;
    torchtitan uses 1), for interval, final and preemption saves. GPU host, 8 GiB per save
    (bench/results/writer-threads-*): 1.05 GiB/s with 1, 3.9 with 4, 7.1 with 8, 13.0 with 16, 14.0
    with 32 (tmpfs); a local disk 0.81 -> 1.88 GiB/s. Each thread writes its own file per rank."""

    early_upload_process: bool = True
    """With ``checkpoint.async_mode = "async_with_pinned_mem"``: start DCP's checkpoint-writing
    process at trainer start, in the background and deaf to SIGTERM/SIGINT, instead of inside the
    first save (where stock spends 10-14 s spawning it, and the pod's SIGTERM kills it with the
    upload in flight). ``torchtitan_runai.training.checkpoint.upload``."""


@dataclass
class Export:
    """[export]: a Hugging Face copy of the model when training completes."""

    at_end: bool = False
    """Write a Hugging Face Llama folder from the final checkpoint when training reaches
    training.steps (rank 0, on the CPU, after the final full checkpoint is saved; the
    checkpoint itself stays resumable). Needs checkpoint.enable."""

    folder: str = "hf"
    """Output folder, relative to job.dump_folder unless absolute."""

    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Weight dtype of the exported safetensors."""

    max_shard_gb: float = 5.0
    """Largest safetensors file, in GB (1e9 bytes); bigger models are split with an index."""


@dataclass
class Goodput:
    """[goodput]: where the job's wall time goes, across restarts (``torchtitan_runai.goodput``)."""

    enable: bool = True
    """Keep the ledger (rank 0; a few small JSON files in <checkpoint folder>/goodput) and print the
    goodput line; false: neither."""

    log_freq: int = 100
    """Steps between goodput lines (and TensorBoard's goodput/ scalars); the launcher prints one more
    when the workers exit."""

    heartbeat_seconds: float = 5.0
    """How often rank 0 writes its ledger record; a kill -9 loses at most this much accounting (it
    shows as "away")."""


@dataclass
class JobConfig:
    """The sections this fork adds to torchtitan's JobConfig (merged by torchtitan's ConfigManager)."""

    resilience: Resilience = field(default_factory=Resilience)
    """Preemption, hang detection and checkpoint-folder ownership (``training.signals``, ``training.watchdog``,
    ``checkpoint.ownership``)."""

    hub: Hub = field(default_factory=Hub)
    """Where the tokenizer comes from on the Hugging Face Hub, and its cache (``torchtitan_runai.hub``,
    ``torchtitan_runai.training.tokenizer``)."""

    data: Data = field(default_factory=Data)
    """Local/PVC dataset format and streaming retries (``torchtitan_runai.training.data``)."""

    perf: Perf = field(default_factory=Perf)
    """Throughput/memory levers measured on the GPU (``torchtitan_runai.training.loss``, bench/)."""

    checkpoint_perf: CheckpointPerf = field(default_factory=CheckpointPerf)
    """Checkpoint-stall levers on top of torchtitan's [checkpoint]
    (``torchtitan_runai.training.checkpoint.staging``)."""

    export: Export = field(default_factory=Export)
    """A Hugging Face copy of the model at the end of training (``torchtitan_runai.hf.export``)."""

    goodput: Goodput = field(default_factory=Goodput)
    """The goodput ledger and its report (``torchtitan_runai.goodput``)."""


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
        raise UserError(
            setting, path, f"cannot be read ({e.strerror})", "make the file readable by the container's user"
        )
    try:
        # utf-8-sig: a byte-order mark (Windows editors add one) is not TOML, but it is no mistake either.
        return tomllib.loads(text.decode("utf-8-sig"))
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


def _flag_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every ``section.key`` (and ``section.sub.key`` for nested sections such as
    ``quantize.linear.float8``) that the command line accepts, with its type."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        annotation = hints.get(f.name, f.type)
        if dataclasses.is_dataclass(annotation):
            out.update(_flag_types(annotation, f"{prefix}{f.name}."))
        elif prefix:
            out[f"{prefix}{f.name}"] = annotation
    return out


def _flag_paths(cls: type, prefix: str = "") -> list[str]:
    return list(_flag_types(cls, prefix))


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _switches(flag: str) -> str:
    head, _, key = flag.rpartition(".")
    return f"--{flag.replace('_', '-')} (on) or --{head}.no-{key.replace('_', '-')} (off)"


def check_cli_flags(args: list[str], cls: type) -> None:
    """The command line's mistakes, each as one line with the right spelling, before tyro sees them
    (tyro's own message is a box of help text): an unknown ``--section.key`` (the nearest valid
    flags), a key without its section (``--steps``: the sections that have it), a value given to a
    switch (``--checkpoint.enable false``: ``--checkpoint.no-enable``), and the launcher's
    ``--dry-run`` anywhere but first."""
    types = _flag_types(cls)
    valid = set(types)
    for index, arg in enumerate(args):
        following = args[index + 1] if index + 1 < len(args) else None
        if arg == "--dry-run":
            raise UserError(
                "command line",
                arg,
                "--dry-run must come first, before every --section.key flag (only the first argument is read "
                "as the launcher's own)",
                "put it first: run_llama_train.sh --dry-run --training.steps 3 ...",
            )
        if not arg.startswith("--") or arg in ("--help", "--h"):
            continue
        name, has_value, value = arg[2:].partition("=")
        flag = name.replace("-", "_")
        if "." not in flag:
            keys = sorted(p for p in valid if p.rpartition(".")[2] in (flag, flag.removeprefix("no_")))
            if keys:
                raise UserError(
                    "command line",
                    arg,
                    f"--{name} has no section",
                    "write it with its section: " + " or ".join(f"--{k}" for k in keys),
                )
            continue
        head, _, key = flag.rpartition(".")
        negated = key.startswith("no_") and f"{head}.{key[3:]}" in valid
        path = f"{head}.{key[3:]}" if negated else flag
        if path not in valid:
            near = difflib.get_close_matches(path, sorted(valid), n=2, cutoff=0.6)
            raise UserError(
                "command line",
                arg,
                f"unknown flag --{name}",
                f"did you mean {' or '.join('--' + n for n in near)}?"
                if near
                else "run with --help for every valid flag",
            )
        if types[path] is bool:
            said = value if has_value else following
            if has_value or (said is not None and said.lower() in _BOOL_WORDS):
                on = _BOOL_WORDS.get((said or "").lower())
                right = f"--{path}" if on else f"--{head}.no-{key.replace('_', '-')}"
                raise UserError(
                    "command line",
                    f"{arg} {said}" if not has_value else arg,
                    f"--{name} is a switch and takes no value",
                    f"write {right}" if on is not None else f"write {_switches(path)}",
                )


def torchtitan_args(args: list[str]) -> list[str]:
    """The arguments torchtitan's ConfigManager gets: ours plus our custom config module."""
    if any(a.split("=")[0] in ("--job.custom_config_module", "--job.custom-config-module") for a in args):
        return list(args)
    return [*args, f"--job.custom_config_module={CUSTOM_CONFIG_MODULE}"]


BOM = b"\xef\xbb\xbf"


@contextlib.contextmanager
def _without_bom(args: list[str]):
    """``args``, with a config file that starts with a UTF-8 byte-order mark swapped for a copy
    without it while torchtitan reads it (its own TOML read rejects the mark)."""
    path = config_file_from_args(args)
    if path is None or not Path(path).is_file() or not Path(path).read_bytes().startswith(BOM):
        yield args
        return
    with tempfile.TemporaryDirectory(prefix="runai-config-") as scratch:
        copy = Path(scratch) / Path(path).name
        copy.write_bytes(Path(path).read_bytes()[len(BOM) :])
        yield [str(copy) if a == path else a.replace(f"={path}", f"={copy}") for a in args]


def _tyro_message(text: str) -> str:
    """tyro's boxed error as one line: the box's frame, its help text and its --help hint left out."""
    text = re.sub(r"[╭╮╰╯│─━┃┏┓┗┛]+", " ", text)
    text = re.split(r"Argument helptext:|For full helptext|Perhaps you meant:", text)[0]
    return re.sub(r"^(.+?) \1", r"\1", " ".join(text.split()))  # the box's title repeats its first line


def parse_config(
    args: list[str], world_size: int | None = None, before_validate: Callable[[Any, int], Any] | None = None
):
    """Parse TOML + command line exactly as the ranks will, then validate the values (not the model:
    ``job.parse_job_config`` does both). Raises UserError.

    ``before_validate(config, world_size)`` adjusts the parsed config first (``job.parse_job_config``
    passes the batch a resume keeps at this size: ``checkpoint.resume.adapt_to_checkpoint``)."""
    toml_path = config_file_from_args(args)
    schema = _merged_config_class()
    if toml_path is not None:
        values = read_toml(toml_path)
        job = values.get("job", {})
        custom = job.get("custom_config_module") if isinstance(job, dict) else None
        if custom not in (None, "", CUSTOM_CONFIG_MODULE):
            raise UserError(
                "job.custom_config_module",
                custom,
                "this fork's config sections live in its own module",
                f"remove the key or set it to '{CUSTOM_CONFIG_MODULE}'",
            )
        check_toml_schema(values, schema)
    check_cli_flags(args, schema)
    stderr = io.StringIO()
    try:
        with redirect_stderr(stderr), _without_bom(args) as upstream_args:
            config = upstream.ConfigManager().parse_args(torchtitan_args(upstream_args))
        if toml_path is not None:
            config.job.config_file = toml_path
    except SystemExit as e:
        message = _tyro_message(stderr.getvalue())
        if e.code in (0, None):  # --help
            print(stderr.getvalue(), end="")
            raise
        raise UserError(
            "command line",
            " ".join(args),
            f"rejected by torchtitan's parser: {message[-600:]}",
            "fix or remove that argument (run with --help for every valid flag)",
        )
    except (ValueError, TypeError) as e:
        raise UserError("config", toml_path, str(e), "fix the config file")
    if before_validate is not None and world_size is not None:
        before_validate(config, world_size)
    validate(config, world_size)
    return config


# ---------------------------------------------------------------------------------------------
# Semantic checks


def _positive(name: str, value: int, fix: str) -> None:
    if value <= 0:
        raise UserError(name, value, "must be positive", fix)


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
            raise UserError(
                f"parallelism.{name}",
                value,
                "invalid degree",
                "use a positive integer (data_parallel_shard_degree may be -1: all remaining ranks)",
            )
    fixed = 1
    for name, value in degrees.items():
        if value > 0:
            fixed *= value
    shard = degrees["data_parallel_shard_degree"]
    shown = ", ".join(f"{k}={v}" for k, v in degrees.items() if v != 1)
    if shard == -1:
        if world_size % fixed:
            raise UserError(
                "parallelism",
                shown,
                f"the fixed degrees multiply to {fixed}, which does not divide the world size {world_size} "
                "(nodes x GPUs per node)",
                f"choose degrees whose product divides {world_size}, or change the node/GPU count",
            )
    elif fixed != world_size:
        raise UserError(
            "parallelism",
            shown,
            f"the degrees multiply to {fixed} but the world size is {world_size} (nodes x GPUs per node)",
            f"make the product equal {world_size}, or set data_parallel_shard_degree = -1",
        )


def global_batch_of(training: Any, dp_degree: int) -> int:
    """G, in sequences, as torchtitan derives it."""
    gbs = training.global_batch_size
    return gbs if gbs > 0 else training.local_batch_size * dp_degree


def wants_pinned_staging(checkpoint_config: Any) -> bool:
    """Whether torchtitan will stage checkpoints through pinned memory with this config."""
    return (
        bool(getattr(checkpoint_config, "enable", False))
        and not bool(getattr(checkpoint_config, "load_only", False))
        and str(getattr(checkpoint_config, "async_mode", "disabled")).lower() == PINNED_MODE
    )


def data_parallel_degree(config, world_size: int) -> int:
    p = config.parallelism
    others = p.tensor_parallel_degree * p.context_parallel_degree * p.pipeline_parallel_degree
    shard = p.data_parallel_shard_degree
    if shard == -1:
        shard = world_size // (others * p.data_parallel_replicate_degree)
    return shard * p.data_parallel_replicate_degree


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_optimizer(config) -> None:
    """The optimizer's numbers, before any worker builds it: torch refuses some only on the ranks,
    with a traceback (betas, eps), and accepts others that wreck the run (a negative learning rate
    climbs the loss; a negative weight decay grows the weights)."""
    o = config.optimizer
    if not _finite(o.lr) or o.lr <= 0:
        raise UserError(
            "optimizer.lr", o.lr, "must be a positive number", "use e.g. 3e-4 (the 8B recipe) or 8e-4 (the debug model)"
        )
    if not _finite(o.weight_decay) or o.weight_decay < 0:
        raise UserError(
            "optimizer.weight_decay", o.weight_decay, "must not be negative", "use 0 (none) or e.g. 0.1 (the default)"
        )
    if not _finite(o.eps) or o.eps <= 0:
        raise UserError(
            "optimizer.eps",
            o.eps,
            "must be a small positive number (it keeps Adam's update from dividing by zero)",
            "use e.g. 1e-8",
        )
    for name in ("beta1", "beta2"):
        value = getattr(o, name)
        if not _finite(value) or not 0 <= value < 1:
            raise UserError(
                f"optimizer.{name}", value, "must be in [0, 1)", "use e.g. beta1 = 0.9, beta2 = 0.95 (the defaults)"
            )


def warmup_note(config) -> str | None:
    """One line when the warmup is longer than the schedule: torchtitan 0.2.2 then cuts the warmup to
    the schedule's length and says so only in every rank's log, after the workers started (hidden by
    LOG_RANK); the launcher prints this before any worker starts."""
    s, steps = config.lr_scheduler, config.training.steps
    total = s.total_steps if s.total_steps is not None else steps
    if steps <= 0 or s.warmup_steps <= total:
        return None
    spans = "lr_scheduler.total_steps" if s.total_steps is not None else "training.steps"
    return (
        f"lr_scheduler.warmup_steps = {s.warmup_steps} is longer than the schedule ({spans} = {total}): torchtitan "
        f"cuts the warmup to {total} steps. Fix: set lr_scheduler.warmup_steps to at most {total} (recipes warm up "
        f"for about a fifth of the steps, here {max(total // 5, 1)}), or raise {spans}"
    )


def check_schedule(config) -> None:
    """The learning-rate schedule's values. torchtitan 0.2.2 lets decay_ratio and min_lr_factor leave
    [0, 1] (a negative or growing learning rate). A warmup longer than the schedule is not refused
    (a short smoke run of a recipe is a fair thing to ask for): ``warmup_note`` says it once."""
    s = config.lr_scheduler
    if s.warmup_steps < 0:
        raise UserError("lr_scheduler.warmup_steps", s.warmup_steps, "must not be negative", "use 0 or more")
    if s.total_steps is not None and s.total_steps <= 0:
        raise UserError(
            "lr_scheduler.total_steps",
            s.total_steps,
            "must be positive",
            "remove it (the schedule then spans training.steps) or set the steps the schedule spans",
        )
    if s.decay_ratio is not None and (not _finite(s.decay_ratio) or not 0 <= s.decay_ratio <= 1):
        raise UserError(
            "lr_scheduler.decay_ratio",
            s.decay_ratio,
            "is the share of the steps spent decaying, so must be in [0, 1]",
            "use e.g. 0.8, or remove it to decay right after the warmup",
        )
    if not _finite(s.min_lr_factor) or not 0 <= s.min_lr_factor <= 1:
        raise UserError(
            "lr_scheduler.min_lr_factor",
            s.min_lr_factor,
            "is the final learning rate as a share of optimizer.lr, so must be in [0, 1]",
            "use e.g. 0.1, or 0 to decay to zero",
        )


def validate(config, world_size: int | None = None) -> None:
    t = config.training
    why = check_seed(config.debug.seed)
    if why:
        raise UserError(
            "debug.seed", config.debug.seed, why, "pick a seed in [0, 4294967295] or remove debug.seed to draw one"
        )
    _positive("training.steps", t.steps, "set training.steps to the number of optimizer steps to run (> 0)")
    _positive("training.local_batch_size", t.local_batch_size, "set a per-rank batch size >= 1")
    _positive("training.seq_len", t.seq_len, "set the sequence length in tokens (e.g. 8192)")
    if t.seq_len > MAX_SEQ_LEN:
        raise UserError(
            "training.seq_len",
            t.seq_len,
            f"exceeds Llama 3.1's trained context of {MAX_SEQ_LEN} tokens",
            f"use at most {MAX_SEQ_LEN}",
        )
    p = config.parallelism
    tp, cp = p.tensor_parallel_degree, p.context_parallel_degree
    divisor = tp * (2 * cp if cp > 1 else 1)
    if divisor > 1 and t.seq_len % divisor:
        parts = f"tensor_parallel_degree={tp}" + (f" x 2 x context_parallel_degree={cp}" if cp > 1 else "")
        raise UserError(
            "training.seq_len",
            t.seq_len,
            f"must be divisible by {divisor} ({parts})",
            f"use a multiple of {divisor}, e.g. {(t.seq_len // divisor + 1) * divisor}",
        )
    if config.metrics.log_freq <= 0:
        raise UserError("metrics.log_freq", config.metrics.log_freq, "must be positive", "log every N steps, e.g. 10")
    ck = config.checkpoint
    if ck.enable:
        _positive("checkpoint.interval", ck.interval, "save every N steps, e.g. 500")
        if ck.keep_latest_k < 0 or ck.keep_latest_k == 1:
            raise UserError(
                "checkpoint.keep_latest_k",
                ck.keep_latest_k,
                "must be 0 (keep all) or at least 2, so a damaged newest checkpoint has a fallback",
                "use 2 or more",
            )
    perf = getattr(config, "checkpoint_perf", None)
    if perf is not None and not 1 <= perf.writer_threads <= 256:
        raise UserError(
            "checkpoint_perf.writer_threads",
            perf.writer_threads,
            "must be between 1 and 256",
            "use 16 (the measured knee on a GPU host) or the count your volume scales to",
        )
    gp = getattr(config, "goodput", None)
    if gp is not None:
        _positive("goodput.log_freq", gp.log_freq, "print a goodput line every N steps, e.g. 100")
        if gp.heartbeat_seconds <= 0:
            raise UserError("goodput.heartbeat_seconds", gp.heartbeat_seconds, "must be positive", "use e.g. 5")
    res = getattr(config, "resilience", None)
    if res is not None:
        if res.hang_timeout_seconds < 0:
            raise UserError(
                "resilience.hang_timeout_seconds",
                res.hang_timeout_seconds,
                "must not be negative",
                "use 0 (off) or a number of seconds above one step plus one checkpoint save, e.g. 600",
            )
        if res.heartbeat_seconds <= 0:
            raise UserError("resilience.heartbeat_seconds", res.heartbeat_seconds, "must be positive", "use e.g. 2")
    if ck.enable and ck.async_mode not in ("disabled", "async", "async_with_pinned_mem"):
        raise UserError(
            "checkpoint.async_mode", ck.async_mode, "unknown mode", 'use "disabled", "async" or "async_with_pinned_mem"'
        )
    if ck.enable and ck.last_save_in_hf:
        raise UserError(
            "checkpoint.last_save_in_hf",
            True,
            "makes the final (and a preemption) checkpoint model-only, which cannot be resumed",
            "remove it and set [export] at_end = true for a Hugging Face copy at the end",
        )
    check_optimizer(config)
    check_schedule(config)
    ex = getattr(config, "export", None)
    if ex is not None and ex.at_end:
        if not ck.enable:
            raise UserError("export.at_end", True, "exports from the final checkpoint", "set checkpoint.enable = true")
        if ex.dtype not in EXPORT_DTYPES:
            raise UserError("export.dtype", ex.dtype, "unsupported", f"one of {EXPORT_DTYPES}")
    fused_model = config.model.name == FUSED_TRAIN_SPEC_NAME
    if config.perf.loss == "fused" and not fused_model:
        raise UserError(
            "perf.loss",
            "fused",
            "needs the model whose output layer feeds the loss",
            f'set model.name = "{FUSED_TRAIN_SPEC_NAME}" or perf.loss = "plain"',
        )
    if fused_model and (tp > 1 or p.pipeline_parallel_degree > 1):
        raise UserError(
            "model.name",
            FUSED_TRAIN_SPEC_NAME,
            "the fused output layer supports FSDP/DDP only",
            f'use model.name = "{TRAIN_SPEC_NAME}" with tensor or pipeline parallelism',
        )
    if config.perf.loss_chunk_tokens <= 0:
        raise UserError("perf.loss_chunk_tokens", config.perf.loss_chunk_tokens, "must be positive", "use e.g. 8192")
    if world_size is not None:
        check_world_size(config, world_size)
        dp = data_parallel_degree(config, world_size)
        gbs = t.global_batch_size
        if gbs > 0 and gbs % (t.local_batch_size * dp):
            raise UserError(
                "training.global_batch_size",
                gbs,
                f"must be a multiple of local_batch_size x data-parallel degree = {t.local_batch_size} x {dp}",
                f"use a multiple of {t.local_batch_size * dp}, or -1",
            )
