"""Make the offline assets of the CPU rehearsal: a small text corpus and a tiny BPE tokenizer.

The rehearsal (``make train``) must run with no network, so it cannot fetch the gated Llama 3.1
tokenizer or C4. This module writes, deterministically:

- ``data/corpus.jsonl``: documents of simple, repetitive English-like text (``{"text": ...}`` per line),
  structured enough that the debug model's loss visibly falls within a few dozen steps;
- ``tokenizer/tokenizer.json`` and ``tokenizer/tokenizer_config.json``: a byte-level BPE tokenizer
  in the Hugging Face format with Llama 3's special tokens, small enough for the debug model's
  2048-entry vocabulary.

Run ``python -m torchtitan_runai.rehearsal [OUT_DIR]`` (default ``assets/rehearsal``). The outputs
are committed; the command exists so they can be rebuilt and reviewed.

Any recipe, rehearsed on CPU: ``run_llama_train.sh --rehearse``
------------------------------------------------------------------

``CONFIG_FILE=./train_configs/llama3_70b.toml ./run_llama_train.sh --rehearse`` runs that recipe on this
machine's CPUs, offline, at toy size, before it ever holds a GPU (``--rehearse --exact`` adds an
uninterrupted reference run and compares the resumed losses with it bit for bit). ``plan_rehearsal``
(pure) turns the recipe into the rehearsal's config:

- its layout: every parallel degree above 1 (TP, PP, data-parallel replicate, FSDP) is kept and
  scaled to fit ``NGPU`` CPU ranks (default 4): each kind gets 2 ranks, FSDP the rest (70B's
  TP 8 x FSDP becomes TP 2 x FSDP 2). Too few ranks for the kinds the recipe uses is one line;
- its features where a CPU runs them: the checkpoint's mode and async mode, activation
  checkpointing, float8 (emulated, where ``torchao`` is installed), the loss, the optimizer, mixed
  precision; each one a CPU cannot run gets one note saying what stands in for it (context parallel,
  async TP, ``torch.compile``, float8 without torchao);
- the debug model's size (``debugmodel``: 6 layers, dim 256) in the recipe's train spec, the
  rehearsal tokenizer and corpus above, a few steps of a short sequence.

``rehearse`` (the driver, called by the launcher's ``--rehearse``) writes that config under
``OUTPUT_DIR`` (else ``./outputs``) in ``rehearsal/<recipe>/`` and runs the launcher as subprocesses:
a run with an interval checkpoint, a SIGTERM (the preemption save), a resume from it to the end, an HF
export of the last checkpoint and its load by ``transformers`` (where installed). It prints one
verdict line per check, a failure naming the recipe setting that caused it (``blame``), and a last
line naming what was proven. Each launch's log is kept in ``rehearsal/<recipe>/logs/``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torchtitan_runai.config import config_file_from_args, read_toml
from torchtitan_runai.errors import UserError

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
VOCAB_SIZE = 2000  # below the debug model's 2048 embeddings
N_DOCS = 1200
SEED = 1234

_SUBJECTS = "the cat|a dog|the old sailor|my neighbour|the small robot|a tired student|the baker|our teacher".split("|")
_VERBS = "sees|builds|carries|paints|finds|loses|cooks|writes about|remembers|follows".split("|")
_OBJECTS = (
    "a red boat|the green door|an empty box|the long road|a warm loaf|the quiet river|a paper map|the tall tree".split(
        "|"
    )
)
_PLACES = (
    "in the morning|near the harbour|after the rain|at the market|under the bridge|before dinner|on the hill".split("|")
)


def make_corpus(n_docs: int = N_DOCS, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
            for _ in range(rng.randint(3, 8))
        ]
        docs.append(" ".join(s[0].upper() + s[1:] for s in sentences))
    return docs


def train_tokenizer(docs, vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return tokenizer


def write_tokenizer(texts, tok_dir: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train on ``texts`` and write tokenizer.json + tokenizer_config.json (what torchtitan loads)."""
    tok_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(texts, vocab_size).save(str(tok_dir / "tokenizer.json"))
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok_dir


def write_assets(out_dir: Path) -> None:
    docs = make_corpus()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "data" / "corpus.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    write_tokenizer(docs, out_dir / "tokenizer")


# ---------------------------------------------------------------------------------------------
# A recipe's rehearsal: the plan (pure)

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "rehearsal"
DEFAULT_RANKS = 4
STEPS = 5  # steps 1-3, the interval checkpoint at 2, the SIGTERM's at 3 (or 4), the resume to 5
INTERVAL = 2
SIGTERM_AFTER = 3  # sent once the trace has step 3: the ranks save at the boundary they reach next
SEQ_LEN = 64
LOCAL_BATCH = 2
TOY_FLAVOR = "debugmodel"
FLOAT8 = "quantize.linear.float8"
PARALLEL_KINDS = (  # (setting, name in the layout line), in the order torchtitan nests the mesh
    ("parallelism.pipeline_parallel_degree", "PP"),
    ("parallelism.data_parallel_replicate_degree", "DP-replicate"),
    ("parallelism.tensor_parallel_degree", "TP"),
)
FSDP = "parallelism.data_parallel_shard_degree"


@dataclass(frozen=True)
class RehearsalPlan:
    """What a recipe becomes on CPU: the settings to change (dotted keys; ``None`` removes one), the
    layout it keeps, the features it runs and a note for each it cannot."""

    settings: dict[str, Any]
    layout: str
    features: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())


def lookup(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``config["a"]["b"]["c"]`` for ``"a.b.c"``; ``default`` where any part is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def with_settings(config: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the TOML ``config`` with each dotted setting set (``None``: removed)."""
    out = json.loads(json.dumps(config))
    for dotted, value in settings.items():
        *sections, key = dotted.split(".")
        node = out
        for part in sections:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    return out


def _degree(config: Mapping[str, Any], setting: str, default: int = 1) -> int:
    value = lookup(config, setting, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(setting, value, "is not a whole number", "set it to a parallel degree such as 2")


def plan_rehearsal(
    config: Mapping[str, Any], ngpu: int, torchao: bool = False, compile_model: bool = False
) -> RehearsalPlan:
    """The rehearsal of the recipe ``config`` (its TOML as a dict, the user's overrides merged) on
    ``ngpu`` CPU ranks; ``torchao``: whether float8 can be emulated here; ``compile_model``: keep the
    recipe's ``torch.compile`` (``--rehearse --compile``; it runs on CPU, but Inductor's first step
    took 2 min on 2 ranks of a shared 2-core machine against 15 s eager, so eager stands in by default).

    Every kind of parallelism the recipe uses stays: PP, DP-replicate and TP above 1 get 2 ranks
    each, FSDP (a shard degree of -1, the recipe's "the rest", or above 1) the ranks left, at least 2.
    Context parallel cannot run on CPU (``launcher/launch:check_device_support``) and is noted."""
    settings: dict[str, Any] = {}
    notes: list[str] = []
    features: list[str] = []
    kinds: list[tuple[str, str]] = [(s, name) for s, name in PARALLEL_KINDS if _degree(config, s) > 1]
    fsdp = _degree(config, FSDP, -1)
    used = [name for _, name in kinds] + (["FSDP"] if fsdp == -1 or fsdp > 1 else [])
    needed = 2 ** len(used)
    if ngpu < needed or ngpu % 2 ** len(kinds):
        layout = " x ".join(used)
        raise UserError(
            "NGPU",
            ngpu,
            f"the recipe's layout ({layout}) needs at least {needed} CPU ranks, a multiple of "
            f"{2 ** len(kinds)}, to keep each kind of parallelism at 2 or more",
            f"set NGPU={needed} for the rehearsal",
        )
    for setting, _ in kinds:
        settings[setting] = 2
    shard = ngpu // 2 ** len(kinds) if "FSDP" in used else 1
    settings[FSDP] = shard
    if "FSDP" not in used and ngpu > 2 ** len(kinds):
        notes.append(f"NGPU={ngpu}: the recipe has no FSDP, so {2 ** len(kinds)} ranks rehearse it")
        settings[FSDP] = 1
    degrees = {name: 2 for _, name in kinds}
    if "FSDP" in used:
        degrees["FSDP"] = shard
    layout = " x ".join(f"{name} {degrees[name]}" for name in used) or "1 rank"
    cp = _degree(config, "parallelism.context_parallel_degree")
    if cp > 1:
        settings["parallelism.context_parallel_degree"] = 1
        notes.append(
            f"context parallel {cp} (parallelism.context_parallel_degree): torch's ring attention shards only "
            "CUDA attention kernels; the rehearsal runs without it"
        )
    if lookup(config, "parallelism.enable_async_tensor_parallel", False):
        settings["parallelism.enable_async_tensor_parallel"] = False
        notes.append(
            "async TP (parallelism.enable_async_tensor_parallel): needs CUDA symmetric memory and a compiled "
            "model; plain TP 2 stands in"
        )
    features.append(f"layout {layout}")

    # The model: the debug model's size in the recipe's train spec (and its loss, optimizer, precision)
    flavor = lookup(config, "model.flavor", TOY_FLAVOR)
    settings["model.flavor"] = TOY_FLAVOR
    if flavor != TOY_FLAVOR:
        notes.append(f"model {flavor} (model.flavor): the debug model (6 layers, dim 256) stands in, same blocks")
    settings["model.hf_assets_path"] = str(ASSETS / "tokenizer")
    settings["hub.repo_id"] = None  # offline: the rehearsal tokenizer, never a download
    settings["training.dataset"] = "local"
    settings["training.dataset_path"] = str(ASSETS / "data")
    settings["training.dataset_name"] = None
    own_assets = "assets/rehearsal" in str(lookup(config, "model.hf_assets_path", ""))
    if lookup(config, "training.dataset", "local") != "local" or not own_assets:
        notes.append("data and tokenizer: the rehearsal corpus and tokenizer stand in (offline)")
    settings["training.steps"] = STEPS
    settings["training.seq_len"] = SEQ_LEN
    settings["training.local_batch_size"] = LOCAL_BATCH
    settings["training.global_batch_size"] = None
    settings["lr_scheduler.warmup_steps"] = 1
    settings["metrics.log_freq"] = 1
    precision = lookup(config, "training.mixed_precision_param", "bfloat16")
    features.append(f"{precision} mixed precision")

    # float8: emulated where torchao is installed; eager only (torchao refuses emulation compiled)
    converters = list(lookup(config, "model.converters", []) or [])
    compile_on = bool(lookup(config, "compile.enable", False))
    if FLOAT8 in converters:
        if torchao:
            settings[f"{FLOAT8}.emulate"] = True
            all_gather = lookup(config, f"{FLOAT8}.enable_fsdp_float8_all_gather", False)
            features.append("float8 (emulated" + (", FSDP float8 all-gather)" if all_gather else ")"))
        else:
            settings["model.converters"] = [c for c in converters if c != FLOAT8]
            notes.append(
                f"float8 (model.converters = {FLOAT8}): torchao is not installed here; the recipe's "
                f"{precision} linears stand in (pip install torchao to rehearse it emulated)"
            )
    if compile_on and FLOAT8 in converters and torchao and "model" in lookup(config, "compile.components", ["model"]):
        settings["compile.enable"] = False
        notes.append("torch.compile (compile.enable): torchao's float8 emulation runs eager only; eager stands in")
    elif compile_on and not compile_model:
        settings["compile.enable"] = False
        notes.append(
            "torch.compile (compile.enable): runs on CPU but costs each launch minutes; eager stands in "
            "(--rehearse --compile keeps it)"
        )
    elif compile_on:
        features.append("torch.compile " + "+".join(lookup(config, "compile.components", ["model"])))

    # Checkpoints: the recipe's own modes, at a toy interval
    settings["checkpoint.enable"] = True
    settings["checkpoint.interval"] = INTERVAL
    settings["checkpoint.initial_load_path"] = None
    settings["checkpoint.load_step"] = None
    if not lookup(config, "checkpoint.enable", False):
        notes.append("checkpoint.enable = false in the recipe: enabled here for the SIGTERM and resume checks")
    async_mode = lookup(config, "checkpoint.async_mode", "disabled")
    features.append(f"checkpoint async_mode {async_mode}")
    ac = lookup(config, "activation_checkpoint.mode", "selective")
    features.append(f"activation checkpointing {ac}")
    return RehearsalPlan(settings, layout, tuple(features), tuple(notes))


# ---------------------------------------------------------------------------------------------
# The recipe as a TOML dict: the user's overrides, and written back


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: Mapping[str, Any]) -> str:
    """The recipe dict as TOML (tables of scalars and lists, nested tables as ``[a.b.c]``)."""
    lines: list[str] = []

    def table(prefix: str, node: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        if prefix and (scalars or len(scalars) == len(node)):  # an empty table is kept
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {_toml_value(value)}")
        if prefix and (scalars or len(scalars) == len(node)):
            lines.append("")
        for key, value in node.items():
            if isinstance(value, Mapping):
                table(f"{prefix}.{key}" if prefix else key, value)

    table("", config)
    return "\n".join(lines)


def _parse_value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def merge_args(config: Mapping[str, Any], args: list[str]) -> tuple[dict[str, Any], str | None]:
    """The user's ``--section.key value`` arguments merged into the recipe dict; (the dict, the
    ``--job.config_file`` named). ``--flag`` alone and ``--no-flag`` are booleans; a list setting
    takes the values that follow it, or a comma-separated one."""
    settings: dict[str, Any] = {}
    config_file = None
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise UserError(arg, None, "is not a --section.key setting", "pass settings as --section.key value")
        key, eq, raw = arg[2:].partition("=")
        values = [raw] if eq else []
        i += 1
        while not eq and i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
        if key in ("job.config_file", "job.config-file"):
            config_file = values[0] if values else None
            continue
        if not values:
            negated = key.split(".")[-1].startswith("no-") or key.startswith("no-")
            key = key.replace("no-", "", 1) if negated else key
            settings[key] = not negated
        elif isinstance(lookup(config, key), list):
            settings[key] = [v for raw in values for v in raw.split(",") if v]
        else:
            settings[key] = _parse_value(values[0])
    return with_settings(config, settings), config_file


# ---------------------------------------------------------------------------------------------
# Which recipe setting a failure comes from (pure)

BLAME = (  # (pattern in a failed launch's log, the setting named), the most specific first
    (r"float8|torchao|Float8", "model.converters (float8)"),
    (r"symm_mem|async_tensor_parallel|micro_pipeline_tp", "parallelism.enable_async_tensor_parallel"),
    (r"inductor|dynamo|torch\._compile|CppCompileError", "compile.enable"),
    (r"[Pp]ipeline|PipelineStage|pp_schedule", "parallelism.pipeline_parallel_degree"),
    (r"context_parallel|ring attention", "parallelism.context_parallel_degree"),
    (r"checkpoint_wrapper|activation checkpoint|recompute", "activation_checkpoint.mode"),
    (r"[Pp]inned|AsyncStager|async_save|staging", "checkpoint.async_mode"),
    (r"DTensor|tensor_parallel|ColwiseParallel|RowwiseParallel|Shard\(", "parallelism.tensor_parallel_degree"),
    (r"fully_shard|FSDP", "parallelism.data_parallel_shard_degree"),
    (r"dcp|DCP|state_dict|\.metadata", "checkpoint (the saved state)"),
)
ERROR_LINE = re.compile(r"error: (.*)$", re.M)


def blame(log: str) -> str:
    """The recipe setting a failed launch's log points at: the launcher's own one-line error names
    its setting; else the first pattern of ``BLAME`` found in the log's traceback part."""
    for line in ERROR_LINE.findall(log):
        if ":" in line and " = " in line.split(":", 1)[0] or line.split(":", 1)[0].count(".") == 1:
            return line.split(":", 1)[0].split(" = ")[0].strip()
    tail = log[log.find("Traceback") :] if "Traceback" in log else log  # no traceback: what the run set up
    for pattern, setting in BLAME:
        if re.search(pattern, tail):
            return setting
    return "the recipe's layout"


# ---------------------------------------------------------------------------------------------
# The driver: the launcher as subprocesses, one verdict line per check

LAUNCHER = Path(__file__).resolve().parents[1] / "run_llama_train.sh"
LAUNCH_TIMEOUT_S = 900.0
STOP_LINE = re.compile(r"stopping at step (\d+) \(signal")
RESUME_LINE = re.compile(r"resuming from step (\d+) \(")
SEED_LINE = re.compile(r"seed: (\d+)  deterministic=")


def read_trace(path: Path) -> dict[int, str]:
    """step -> loss (``float.hex``) from a step trace; a step run again keeps its last value."""
    out: dict[int, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                out[record["step"]] = record["loss"]
    return out


class Failed(Exception):
    """A check failed: its verdict line was printed; the rehearsal stops there."""


class Rehearsal:
    """One recipe's rehearsal in ``folder`` (``rehearsal/<recipe>`` under the output folder)."""

    def __init__(self, recipe: Path, plan: RehearsalPlan, config_file: Path, folder: Path, ngpu: int, env):
        self.recipe, self.plan, self.config_file, self.folder = recipe, plan, config_file, folder
        self.ngpu, self.base_env = ngpu, env
        self.proven: list[str] = []

    def say(self, verdict: str, check: str, line: str) -> None:
        print(f"[rehearse] {verdict:4}  {check}: {line}", flush=True)

    def fail(self, check: str, why: str, log: Path | None = None, setting: str | None = None) -> None:
        """Print the FAIL line: ``setting``, else the one the log points at (``blame``)."""
        text = log.read_text(errors="replace") if log is not None and log.is_file() else ""
        where = f" (log: {log})" if log is not None else ""
        self.say("FAIL", check, f"{why}; caused by {setting or blame(text)}{where}")
        raise Failed(check)

    def launch(self, name: str, dump: Path, *args: str, stop_after: int | None = None) -> tuple[int, Path, Path]:
        """One launch of the rehearsal config; (exit code, its log, its step trace). ``stop_after``:
        SIGTERM the launcher (as Kubernetes does a pod's) once that step is done."""
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log, trace = logs / f"{name}.log", logs / f"{name}-trace.jsonl"
        env = {k: v for k, v in self.base_env.items() if k not in ("OUTPUT_DIR", "CONFIG_FILE")}
        env.update(
            NGPU=str(self.ngpu),
            CONFIG_FILE=str(self.config_file),
            TORCHTITAN_RUNAI_STEP_TRACE=str(trace),
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            LOG_RANK="0",
            MAX_RESTARTS="0",
        )
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["bash", str(LAUNCHER), "--job.dump_folder", str(dump), *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        signalled = False
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    self.fail(name, f"no end within {LAUNCH_TIMEOUT_S:.0f} s", log)
                if stop_after is not None and not signalled and max(read_trace(trace), default=0) >= stop_after:
                    proc.send_signal(signal.SIGTERM)
                    signalled = True
                time.sleep(0.2)
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        return proc.returncode, log, trace

    def run(self, exact: bool) -> None:
        dump = self.folder / "run"
        losses = self.first_run(dump)
        resumed = self.resume(dump, losses)
        if exact:
            self.compare(resumed)
        self.export(dump)

    def first_run(self, dump: Path) -> dict[int, str]:
        code, log, trace = self.launch("first", dump, stop_after=SIGTERM_AFTER)
        text = log.read_text(errors="replace")
        losses = read_trace(trace)
        if code != 143 or not losses:
            why = f"exit {code}, expected 143 after a SIGTERM" if losses else f"exit {code} before step 1"
            self.fail("train", why, log)
        first, last = min(losses), max(losses)
        self.check_losses("train", losses, log)
        shown = {step: float.fromhex(loss) for step, loss in losses.items()} | logged_losses(text)
        self.say(
            "PASS",
            "train",
            f"steps {first}-{last} as {self.plan.layout} on {self.ngpu} CPU ranks, loss "
            f"{shown[first]:.4f} -> {shown[last]:.4f}",
        )
        if not (dump / "checkpoint" / f"step-{INTERVAL}" / ".metadata").is_file():
            self.fail("checkpoint", f"no complete step-{INTERVAL} after checkpoint.interval = {INTERVAL}", log)
        self.say("PASS", "checkpoint", f"step-{INTERVAL} written at checkpoint.interval = {INTERVAL}")
        stop = STOP_LINE.search(text)
        if stop is None or not (dump / "checkpoint" / f"step-{stop.group(1)}" / ".metadata").is_file():
            self.fail("SIGTERM", "no preemption checkpoint after the SIGTERM", log)
        self.stopped = int(stop.group(1))
        seed = SEED_LINE.search(text)
        self.seed = seed.group(1) if seed else None
        self.say("PASS", "SIGTERM", f"stopped at step {self.stopped} with a full checkpoint, exit 143")
        self.proven += ["trains", "checkpoints", "stops on SIGTERM"]
        return losses

    def resume(self, dump: Path, before: dict[int, str]) -> dict[int, str]:
        code, log, trace = self.launch("resume", dump)
        text = log.read_text(errors="replace")
        resumed = RESUME_LINE.search(text)
        losses = read_trace(trace)
        if code != 0:
            self.fail("resume", f"exit {code}", log)
        if resumed is None or int(resumed.group(1)) != self.stopped or min(losses, default=0) != self.stopped + 1:
            self.fail("resume", f"did not continue from the SIGTERM's step-{self.stopped}", log)
        if max(losses) != STEPS:
            self.fail("resume", f"ended at step {max(losses)}, not {STEPS}", log)
        self.check_losses("resume", losses, log)
        loss = logged_losses(text).get(STEPS, float.fromhex(losses[STEPS]))
        self.say("PASS", "resume", f"from step-{self.stopped} to step {STEPS}, loss {loss:.4f}")
        self.proven.append("resumes")
        return losses

    def check_losses(self, check: str, losses: dict[int, str], log: Path) -> None:
        """Every step's loss a cross-entropy: not NaN, not infinite, not -1 (the value a rank that
        holds no loss logs: a first pipeline stage)."""
        bad = [step for step, loss in sorted(losses.items()) if not 0 < float.fromhex(loss) < math.inf]
        if bad:
            value = float.fromhex(losses[bad[0]])
            pp = "PP" in self.plan.layout.split() and value == -1
            setting = "parallelism.pipeline_parallel_degree" if pp else None
            self.fail(check, f"step {bad[0]} logged loss {value}, not a cross-entropy", log, setting)

    def compare(self, resumed: dict[int, str]) -> None:
        # the first run's seed (the recipe's, else the one it drew and logged): the same initial weights
        seed = () if self.seed is None else ("--debug.seed", self.seed)
        code, log, trace = self.launch("reference", self.folder / "reference", *seed)
        reference = read_trace(trace)
        if code != 0 or max(reference, default=0) != STEPS:
            self.fail("exact resume", f"the uninterrupted reference run failed (exit {code})", log)
        differ = [step for step in resumed if resumed[step] != reference.get(step)]
        if differ:
            step = differ[0]
            self.fail(
                "exact resume",
                f"step {step}'s loss after the resume is {resumed[step]}, uninterrupted {reference.get(step)}",
                log,
            )
        steps = sorted(resumed)
        self.say("PASS", "exact resume", f"steps {steps[0]}-{steps[-1]} equal the uninterrupted run's (float.hex)")
        self.proven[-1] = "resumes bit-identically"

    def export(self, dump: Path) -> None:
        step_dir = dump / "checkpoint" / f"step-{STEPS}"
        hf_dir = self.folder / "hf"
        log = self.folder / "logs" / "export.log"
        command = [
            sys.executable,
            "-m",
            "torchtitan_runai.export",
            str(step_dir),
            str(hf_dir),
            "--config",
            str(self.config_file),
            "--dtype",
            "float32",
            "--overwrite",
        ]
        with open(log, "w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=self.child_env()).returncode
        if code != 0:
            self.fail("HF export", f"exporting {step_dir} failed (exit {code})", log)
        self.say("PASS", "HF export", f"step-{STEPS} -> {hf_dir}")
        self.proven.append("exports to Hugging Face")
        try:
            import transformers  # noqa: F401  (only whether it is there)
        except ImportError:
            self.say("SKIP", "HF load", "transformers is not installed here")
            return
        log = self.folder / "logs" / "load.log"
        command = [sys.executable, "-m", "torchtitan_runai.rehearsal", "--load-hf", str(hf_dir)]
        with open(log, "w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=self.child_env()).returncode
        text = log.read_text(errors="replace")
        found = re.search(r"^loss ([0-9.]+)$", text, re.M)
        if code != 0 or found is None:
            self.fail("HF load", f"transformers could not load {hf_dir} (exit {code})", log)
        self.say("PASS", "HF load", f"transformers' LlamaForCausalLM, loss {found.group(1)} on the corpus")
        self.proven[-1] = "exports to Hugging Face (loaded by transformers)"

    def child_env(self) -> dict[str, str]:
        env = dict(self.base_env)
        env["HF_HUB_OFFLINE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LAUNCHER.parent), env.get("PYTHONPATH", "")]))
        return env


STEP_LOSS = re.compile(r"step:\s*(\d+)\s+loss:\s*(\S+)")


def logged_losses(log: str) -> dict[int, float]:
    """step -> the loss the log shows (the step trace holds rank 0's exact local value)."""
    found = {}
    for step, value in STEP_LOSS.findall(log):
        try:
            found[int(step)] = float(value)
        except ValueError:
            pass
    return found


def load_hf(folder: str) -> float:
    """``python -m torchtitan_runai.rehearsal --load-hf FOLDER``: load an exported folder with
    transformers and print its loss on the first documents of the corpus (a finite number)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    docs = [json.loads(line)["text"] for line in (ASSETS / "data" / "corpus.jsonl").read_text().splitlines()[:4]]
    ids = tokenizer(" ".join(docs), return_tensors="pt").input_ids[:, :SEQ_LEN]
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    if not math.isfinite(loss):
        raise SystemExit(f"loss is {loss}")
    print(f"loss {loss:.4f}")
    return loss


def torchao_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def rehearse(trainer_args: list[str], env: Mapping[str, str]) -> int:
    """``run_llama_train.sh --rehearse [--exact] [--compile] [--section.key value ...]``: the recipe that
    ``trainer_args`` names (``--job.config_file``, the launcher's ``trainer_args``) rehearsed on CPU.
    0 when every check passed, 1 when one failed (its line names the setting)."""
    options = {"--exact", "--compile"}
    exact, compile_model = "--exact" in trainer_args, "--compile" in trainer_args
    args = [a for a in trainer_args if a not in options]
    recipe_path = config_file_from_args(args) or ""
    base = read_toml(recipe_path)  # a missing or broken recipe: one line
    recipe = Path(recipe_path)
    config, _ = merge_args(base, args)
    raw = env.get("NGPU") or str(DEFAULT_RANKS)
    if not raw.strip().isdigit() or int(raw) < 1:
        raise UserError("NGPU", raw, "is not a number of CPU ranks", f"set NGPU to e.g. {DEFAULT_RANKS}, or unset it")
    ngpu = int(raw)
    plan = plan_rehearsal(config, ngpu, torchao=torchao_installed(), compile_model=compile_model)
    folder = Path(env.get("OUTPUT_DIR") or "./outputs").resolve() / "rehearsal" / recipe.stem
    if folder.exists():  # the rehearsal's own folder: each rehearsal starts clean
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config_file = folder / "rehearsal.toml"
    config_file.write_text(
        f"# The CPU rehearsal of {recipe} (torchtitan_runai/rehearsal.py), NGPU={ngpu}\n"
        + to_toml(with_settings(config, plan.settings))
    )
    print(f"[rehearse] {recipe}: {plan.layout} on {ngpu} CPU ranks; config {config_file}", flush=True)
    for note in plan.notes:
        print(f"[rehearse] note  {note}", flush=True)
    started = time.monotonic()
    rehearsal = Rehearsal(recipe, plan, config_file, folder, ngpu, dict(env))
    try:
        rehearsal.run(exact)
    except Failed as failed:
        print(f"[rehearse] {recipe.name} FAILED at {failed} after {time.monotonic() - started:.0f} s", flush=True)
        return 1
    print(
        f"[rehearse] proven on CPU in {time.monotonic() - started:.0f} s: {recipe.name} with "
        f"{', '.join(plan.features)} {', '.join(rehearsal.proven)}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load-hf"]:
        load_hf(sys.argv[2])
    else:
        target = Path(sys.argv[1] if len(sys.argv) > 1 else "assets/rehearsal")
        write_assets(target)
        print(f"wrote rehearsal assets to {target}")
