"""Which checkpoint a job resumes from, and whether it may.

The policy, in one place:

- which one: ``choose``: ``checkpoint.load_step`` when set (it must exist and be complete), else the
  newest *resumable* one (complete and ``full``: ``checkpoint.folder``); newer incomplete ones are
  skipped (the trainer moves them to ``.incomplete/``), newer model-only ones are skipped with a note;
  a folder whose only complete checkpoints are model-only (stock's final save) stops with how to
  continue from those weights (``checkpoint.initial_load_path``) instead of silently starting over;
  a stock checkpoint without our marker is adopted (``checkpoint.folder``) and said so;
- whether it may, and with which batch: a changed data-parallel degree keeps the global batch, the
  schedule and the data position (``plan_resume``: local batch x accumulation adapt; a size that
  cannot keep the global batch, changed tensor/pipeline/context parallel degrees, or per-rank data
  positions at another size stop, with how to proceed: the same settings, or the model-only route
  (``weights_route``: a new folder that starts from the checkpoint's weights, at any layout);
  ``adapt_to_checkpoint`` applies the plan to the config before it is validated); changed schedule
  settings resume with loud, concrete warnings (``schedule_changes``); a checkpoint at or past
  ``training.steps`` means there is nothing to train (``already_done``: the launcher exits 0);
- what happens to every other changed setting: each checkpoint's marker keeps the job's settings
  (``settings_of``, the marker's "settings"). On resume every one that differs is named with its fate:

  - refused (``refuse_changes``, ``REFUSED_KEYS``): the model (``model.name``, ``model.flavor``: the
    weights' shape), ``training.seq_len`` and ``training.dataset`` (the data position counts windows
    of that length in that dataset): one UserError naming the checkpoint's value and the way on (the
    same value, or a new folder that starts from the weights: ``weights_route``);
  - applied from the step after the checkpoint's (``SCHEDULE_KEYS``, ``APPLIED_KEYS``): the schedule,
    the optimizer's learning rate, betas, eps and weight decay (set on the restored optimizer by the
    trainer's manager: torch would restore the checkpoint's), ``max_norm``, the checkpoint interval
    and retention;
  - kept from the checkpoint (``KEPT_KEYS``): the global batch (a new local batch applies as local
    batch × accumulation when it divides the per-rank share, else the nearest one below it is used,
    said in a line), and the seed (``reuse_seed``: an unset ``debug.seed`` takes the checkpoint's,
    another one is replaced, said in a line);
  - a marker from before settings were kept: "settings not recorded", once, and only the schedule,
    the batch and ``seq_len`` (its "data" entry) are compared.

  ``adapt_to_checkpoint`` decides (every process, before validation, from the user's values); the
  launcher's ``prestart`` prints the lines once per pod (``resume_report``).

``prestart`` is the launcher's check, once per pod before any worker starts; the trainer's
``RunaiCheckpointManager.choose`` applies the same ``choose`` on rank 0 when it loads.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from torchtitan_runai import storage
from torchtitan_runai.checkpoint.folder import StepFolder, check_writable, examine, scan, step_folders
from torchtitan_runai.checkpoint.ownership import claim_folder
from torchtitan_runai.config import data_parallel_degree, global_batch_of
from torchtitan_runai.errors import UserError

GLOBAL_ORDER = "lanes-1"
"""The data position's format in the marker: one global order, resumable at any data-parallel size
(``training.data_position``)."""
PER_RANK = "per-rank"
"""torchtitan's per-rank loader state: resumable at the same size only."""

SCHEDULE_KEYS = (
    "training.steps",
    "lr_scheduler.warmup_steps",
    "lr_scheduler.total_steps",
    "lr_scheduler.decay_ratio",
    "lr_scheduler.decay_type",
    "lr_scheduler.min_lr_factor",
)


def choose(found: Iterable[StepFolder], load_step: int, folder: Path, initial_load: bool = False) -> StepFolder | None:
    """The checkpoint to resume from among ``found`` (``scan``, newest first); None: start fresh.

    ``load_step >= 0`` names one, which must exist and be complete (UserError otherwise); else the
    newest resumable one. With none resumable but a complete model-only one (and no
    ``initial_load``): UserError pointing to ``checkpoint.initial_load_path``. ``found`` is read only
    as far as the answer needs: a lazy one (``examine`` on demand) examines no older checkpoint."""
    if load_step < 0:
        weights = None
        for f in found:
            if f.resumable:
                return f
            if f.complete and weights is None:
                weights = f
        if weights is not None and not initial_load:
            raise model_only_error(weights)
        return None
    chosen = next((f for f in found if f.step == load_step), None)
    if chosen is None or not chosen.complete:
        raise UserError(
            "checkpoint.load_step",
            load_step,
            f"{folder}/step-{load_step} " + ("does not exist" if chosen is None else f"is incomplete ({chosen.why})"),
            "pick a complete step-N folder, or unset checkpoint.load_step to resume from the newest",
        )
    return chosen


def weights_route(found: StepFolder) -> str:
    """The flags that start a new run from ``found``'s model weights alone (torchtitan's initial load,
    ``checkpoint.initial_load_path``): what is left when ``found`` cannot be resumed. The weights load
    at any layout (DCP reshards them by name); optimizer state and the data position start afresh.
    ``<new>`` is the new run's checkpoint folder, one without checkpoints: in the old one the newest
    checkpoint would be resumed (and refused) again, and an initial load is read only where there is
    nothing to resume."""
    return (
        f"--checkpoint.folder <new> --checkpoint.initial_load_path {shlex.quote(str(found.path))} "
        "--checkpoint.initial_load_model_only"
    )


def model_only_error(found: StepFolder) -> UserError:
    return UserError(
        "checkpoint.folder",
        str(found.path.parent),
        f"its newest complete checkpoint {found.path.name} holds model weights only (no optimizer or train "
        "state; stock torchtitan's final save), so it cannot be resumed",
        f"continue from its weights in a new folder: {weights_route(found)} (optimizer state and data position "
        "start afresh), or move it away to start over",
    )


def model_only_note(found: StepFolder) -> str:
    return (
        f"skipping {found.path}: a model-only checkpoint cannot be resumed (to start a run from its weights: "
        f"--checkpoint.initial_load_path {found.path} --checkpoint.initial_load_model_only)"
    )


def adoption_note(found: StepFolder) -> str:
    return (
        f"adopted {found.path}: a complete checkpoint without this fork's completion marker (stock "
        "torchtitan's): .metadata readable, every shard as long as it says, model, optimizer and train "
        "state present"
    )


def schedule_of(config: Any) -> dict[str, Any]:
    out = {}
    for key in SCHEDULE_KEYS:
        section, name = key.split(".")
        out[key] = getattr(getattr(config, section), name)
    return out


def _total(schedule: Mapping[str, Any]) -> int:
    return schedule.get("lr_scheduler.total_steps") or schedule["training.steps"]


def schedule_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any], step: int) -> list[str]:
    """Loud, concrete warnings for a resume whose schedule settings differ from the checkpoint's."""
    if not old:
        return []
    changed = [k for k in SCHEDULE_KEYS if k in old and old.get(k) != new.get(k)]
    if not changed:
        return []
    what = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
    lines = [f"resume from step {step} with changed schedule settings, applied from step {step + 1}: {what}"]
    old_total, new_total = _total(old), _total(new)
    if old_total != new_total:
        lines.append(
            f"the learning-rate schedule is recomputed over {new_total} steps instead of {old_total}: "
            f"its decay now ends at step {new_total} (was {old_total}), so every step after {step} "
            "trains with a different learning rate than the original run planned; "
            f"to keep the original schedule pass --lr_scheduler.total_steps {old_total}"
        )
    if old.get("lr_scheduler.warmup_steps") != new.get("lr_scheduler.warmup_steps"):
        lines.append(
            f"warmup now ends at step {new.get('lr_scheduler.warmup_steps')} "
            f"(was {old.get('lr_scheduler.warmup_steps')})"
        )
    if old.get("training.steps") != new.get("training.steps"):
        lines.append(f"training now stops at step {new.get('training.steps')} (was {old.get('training.steps')})")
    return lines


# ---------------------------------------------------------------------------------------------
# The job's settings, kept with each checkpoint (the marker's "settings"), and what a resume does
# with each one that differs: refused, applied from the resumed step, or kept from the checkpoint.

REFUSED_KEYS = ("model.name", "model.flavor", "training.seq_len", "training.dataset")
"""What a checkpoint fixes: the model's shape (its weights and optimizer state), and what its data
position counts in (windows of ``seq_len`` tokens of one dataset). A change is one UserError."""
APPLIED_KEYS = (
    "optimizer.lr",
    "optimizer.beta1",
    "optimizer.beta2",
    "optimizer.eps",
    "optimizer.weight_decay",
    "training.max_norm",
    "checkpoint.interval",
    "checkpoint.keep_latest_k",
)
"""Besides ``SCHEDULE_KEYS``: this run's value applies from the step after the checkpoint's (the
optimizer's values are set on its restored state: ``RunaiCheckpointManager.load``)."""
KEPT_KEYS = ("training.local_batch_size", "training.global_batch_size", "debug.seed")
"""The checkpoint's value wins, with a line: its global batch (the local batch is recomputed,
``plan_resume``) and its seed (``reuse_seed``)."""
SETTINGS_KEYS = REFUSED_KEYS + SCHEDULE_KEYS + APPLIED_KEYS + KEPT_KEYS
_REPORT = "_runai_resume_report"  # where adapt_to_checkpoint leaves its lines for the launcher

_MISSING = object()


def settings_of(config: Any) -> dict[str, Any]:
    """The marker's "settings": every key of ``SETTINGS_KEYS`` the config has, as it trains."""
    out = {}
    for key in SETTINGS_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section, None), name, _MISSING)
        if value is not _MISSING:
            out[key] = value
    return out


def _refusal(found: StepFolder, key: str, old: Any, new: Any) -> UserError:
    keep = f"resume it with --{key} {old}"
    fresh = (
        f"continue from its weights with {key} = {new} in a new folder: {weights_route(found)} "
        "(optimizer state and data position start afresh)"
    )
    if key.startswith("model."):
        why = f"{found.path} holds a model built with {key} = {old!r}: its weights and optimizer state have that shape"
        fresh = "or start the new model in a fresh OUTPUT_DIR (or --checkpoint.folder <new>)"
    elif key == "training.seq_len":
        why = (
            f"{found.path} was written with {key} = {old}: its data position counts windows of {old} tokens, "
            "which another length cannot continue"
        )
        fresh = f"or {fresh}"
    else:
        why = f"{found.path} was written with {key} = {old!r}: its data position is a place in that dataset"
        fresh = f"or {fresh}"
    return UserError(key, new, why, f"{keep}; {fresh}")


def refuse_changes(found: StepFolder, asked: Mapping[str, Any]) -> None:
    """UserError for the first of ``REFUSED_KEYS`` that differs from the checkpoint's value (a marker
    without settings still has its ``seq_len`` in "data")."""
    rec = found.record or {}
    old = dict(rec.get("settings") or {})
    data = rec.get("data") or {}
    if "training.seq_len" not in old and "seq_len" in data:
        old["training.seq_len"] = data["seq_len"]
    for key in REFUSED_KEYS:
        if key in old and key in asked and old[key] != asked[key]:
            raise _refusal(found, key, old[key], asked[key])


def setting_changes(found: StepFolder, asked: Mapping[str, Any], plan: BatchPlan | None) -> list[str]:
    """One line (or a few) for every setting that differs from the checkpoint's and is not refused:
    what the resume does with it. ``asked`` is ``settings_of`` the config before the resume adapted it."""
    rec = found.record or {}
    old = rec.get("settings")
    lines = []
    if old is None:
        lines.append(
            f"settings not recorded in {found.path} (written before checkpoints kept the job's settings): only "
            "the schedule and the batch are compared; this run's settings are recorded with its next checkpoint"
        )
        old_schedule = rec.get("schedule")
    else:
        old_schedule = {k: old[k] for k in SCHEDULE_KEYS if k in old}
    lines += schedule_changes(old_schedule, {k: asked.get(k) for k in SCHEDULE_KEYS}, found.step)
    for key in APPLIED_KEYS:
        if old and key in old and key in asked and old[key] != asked[key]:
            lines.append(f"{key} {old[key]!r} -> {asked[key]!r}: applied from step {found.step + 1}")
    lines += _batch_lines(found, asked, plan)
    return lines


def _batch_lines(found: StepFolder, asked: Mapping[str, Any], plan: BatchPlan | None) -> list[str]:
    rec = found.record or {}
    data = rec.get("data") or {}
    old_local = (rec.get("settings") or {}).get("training.local_batch_size", data.get("local_batch"))
    local = asked.get("training.local_batch_size")
    if plan is None:
        if old_local is not None and local is not None and local != old_local:
            return [
                f"training.local_batch_size {old_local} -> {local}: applied from step {found.step + 1} (this "
                "checkpoint's data positions are per-rank, so the global batch follows the local batch)"
            ]
        return []
    lines = [plan.line()] if plan.changed else []
    route = f"a different global batch needs a new folder that starts from its weights: {weights_route(found)}"
    if local is not None and local != plan.local_batch:
        per_rank = plan.global_batch // plan.dp
        lines.append(
            f"training.local_batch_size {local}: not applied, the run trains with local batch {plan.local_batch} "
            f"× accumulation {plan.accumulation}: the checkpoint's global batch of {plan.global_batch} sequences is "
            f"kept (its data position counts in it), {per_rank} per data-parallel rank at {plan.dp}, and "
            f"{plan.local_batch} is the largest local batch up to {local} that divides it; {route}"
        )
    elif old_local is not None and local is not None and local != old_local:
        lines.append(
            f"training.local_batch_size {old_local} -> {local}: applied from step {found.step + 1}, as local batch "
            f"{plan.local_batch} × accumulation {plan.accumulation}; the global batch of {plan.global_batch} "
            f"sequences is kept from the checkpoint (its data position counts in it); {route}"
        )
    return lines


def reuse_seed(found: StepFolder, config: Any) -> str | None:
    """Set ``debug.seed`` to the seed ``found`` was trained with (``seed.py``: a job's seed is drawn
    once and kept); the line that says so, or None when there is nothing to say."""
    stored = (found.record or {}).get("settings", {}).get("debug.seed")
    debug = getattr(config, "debug", None)
    if stored is None or debug is None:
        return None
    asked = debug.seed
    debug.seed = stored
    if asked is None:
        return f"debug.seed: the checkpoint's seed {stored} is reused (a job keeps the seed it started with)"
    if asked != stored:
        return (
            f"debug.seed {asked}: kept from the checkpoint, the run keeps seed {stored} (each rank's RNG state "
            f"continues from the checkpoint); to train with seed {asked}, continue from its weights in a new "
            f"folder: {weights_route(found)}"
        )
    return None


def per_rank_error(found: StepFolder, world_size: int, dp_degree: int) -> UserError:
    rec = found.record or {}
    old_dp, old_ws = rec.get("dp_degree"), rec.get("world_size")
    return UserError(
        "world size",
        f"{old_ws} -> {world_size}",
        f"{found.path} was written by {old_dp} data-parallel rank(s) (world size {old_ws}) with per-rank data "
        f'positions (data.order = "per-rank", or a checkpoint from before global data positions); this run has '
        f"{dp_degree} (world size {world_size}), so they cannot be restored",
        f"run with the original node/GPU count (world size {old_ws}), or continue from its weights in a new folder: "
        f"{weights_route(found)} (optimizer state and data position start afresh)",
    )


# ---------------------------------------------------------------------------------------------
# Resume policy: a changed data-parallel size keeps the global batch, the schedule and the data
# position (torchtitan_runai.data_position); tensor/pipeline/context parallel degrees stay as saved.

_MODEL_PARALLEL = (
    ("tp", "tensor_parallel_degree"),
    ("pp", "pipeline_parallel_degree"),
    ("cp", "context_parallel_degree"),
)


@dataclass(frozen=True)
class BatchPlan:
    """How a resumed run keeps its checkpoint's global batch at this run's data-parallel size."""

    saved_dp: int
    dp: int
    global_batch: int
    local_batch: int
    accumulation: int
    step: int
    seq_len: int

    @property
    def changed(self) -> bool:
        return self.saved_dp != self.dp

    @property
    def position(self) -> int:
        """Sequences the whole job has consumed at the checkpoint."""
        return self.step * self.global_batch

    def line(self) -> str:
        return (
            f"resuming at data-parallel {self.dp} (checkpoint written at {self.saved_dp}): global batch "
            f"{self.global_batch} kept, local batch {self.local_batch} × accumulation {self.accumulation}, "
            f"data position {self.position} sequences ({self.position * self.seq_len:,} tokens)"
        )


def data_record(config: Any, dp_degree: int, data_format: str) -> dict[str, Any]:
    """The marker's "data" entry: what a resume at another size needs to keep."""
    t, p = config.training, config.parallelism
    global_batch = global_batch_of(t, dp_degree)
    return {
        "format": data_format,
        "global_batch": global_batch,
        "local_batch": t.local_batch_size,
        "accumulation": global_batch // (t.local_batch_size * dp_degree),
        "seq_len": t.seq_len,
        **{key: getattr(p, name) for key, name in _MODEL_PARALLEL},
    }


def split_batch(global_batch: int, dp_degree: int, local_batch: int) -> tuple[int, int] | None:
    """(local batch, accumulation) for ``global_batch`` over ``dp_degree`` ranks: the configured local
    batch when it fits, else the largest that does below it (memory never grows); None if impossible."""
    if dp_degree <= 0 or global_batch % dp_degree:
        return None
    per_rank = global_batch // dp_degree
    local = max(d for d in range(1, min(local_batch, per_rank) + 1) if per_rank % d == 0)
    return local, per_rank // local


def plan_resume(found: StepFolder, config: Any, world_size: int, dp_degree: int) -> BatchPlan | None:
    """The batch a resume from ``found`` runs with at ``dp_degree``; None: as configured.

    Raises UserError when the checkpoint cannot continue at this size: changed tensor/pipeline/context
    parallel degrees, per-rank data positions, another explicit global batch, or a data-parallel size
    that does not divide the global batch."""
    rec = found.record or {}
    old_dp, old_ws = rec.get("dp_degree"), rec.get("world_size")
    if old_dp is None:
        return None
    data = rec.get("data") or {}
    for key, name in _MODEL_PARALLEL:
        if key in data and data[key] != getattr(config.parallelism, name):
            raise UserError(
                f"parallelism.{name}",
                getattr(config.parallelism, name),
                f"{found.path} was written with {name} = {data[key]}; only the data-parallel size "
                "(the node or GPU count) may change on resume",
                f"resume it at the checkpoint's layout: --parallelism.{name} {data[key]}; or continue from its "
                f"weights at this layout in a new folder: {weights_route(found)} (optimizer state and data "
                "position start afresh)",
            )
    if not data and old_ws and world_size // dp_degree != old_ws // old_dp:
        raise UserError(
            "parallelism",
            f"{old_ws // old_dp} -> {world_size // dp_degree} GPU(s) per data-parallel rank",
            f"{found.path} was written with tensor x pipeline x context parallel = {old_ws // old_dp}; "
            "only the data-parallel size may change on resume",
            "resume it with the checkpoint's tensor/pipeline/context parallel degrees; or continue from its "
            f"weights at this layout in a new folder: {weights_route(found)} (optimizer state and data "
            "position start afresh)",
        )
    if data.get("format") != GLOBAL_ORDER:
        if old_dp != dp_degree:
            raise per_rank_error(found, world_size, dp_degree)
        return None
    global_batch = data["global_batch"]
    t = config.training
    if t.global_batch_size > 0 and t.global_batch_size != global_batch:
        raise UserError(
            "training.global_batch_size",
            t.global_batch_size,
            f"{found.path} continues a run with a global batch of {global_batch} sequences (its data "
            "position is defined over that many sequences per step)",
            f"remove the setting (a resume keeps {global_batch}), or continue from its weights in a new "
            f"folder: {weights_route(found)}",
        )
    split = split_batch(global_batch, dp_degree, t.local_batch_size)
    if split is None:
        other = world_size // dp_degree
        sizes = [d for d in range(1, global_batch + 1) if global_batch % d == 0]
        shown = ", ".join(f"{d} (world size {d * other})" for d in sizes[:12])
        raise UserError(
            "world size",
            f"{old_ws} -> {world_size}",
            f"the run's global batch of {global_batch} sequences (from {found.path}) cannot be split "
            f"over {dp_degree} data-parallel ranks",
            f"use a data-parallel size that divides {global_batch}: {shown}",
        )
    local, accumulation = split
    return BatchPlan(old_dp, dp_degree, global_batch, local, accumulation, found.step, t.seq_len)


def apply_plan(plan: BatchPlan, config: Any) -> None:
    config.training.global_batch_size = plan.global_batch
    config.training.local_batch_size = plan.local_batch


def adapt_to_checkpoint(config: Any, world_size: int) -> BatchPlan | None:
    """Take what a resume from this folder keeps (before validation): refuse what cannot change
    (``refuse_changes``), set the global and local batch (``plan_resume``) and the checkpoint's seed
    (``reuse_seed``), and leave the report of every changed setting on the config for the launcher
    to print once (``resume_report``)."""
    if not config.checkpoint.enable:
        return None
    folder = storage.checkpoint_dir(config)
    # every rank runs this at start: examined newest first, only as far as the choice needs; a folder with
    # only model-only checkpoints keeps the configured batch here (initial_load=True): that refusal is the
    # launcher's (prestart) and the loading manager's, which know the real checkpoint.initial_load_path
    lazily = (examine(path, step) for step, path in step_folders(folder))
    chosen = choose(lazily, config.checkpoint.load_step, folder, initial_load=True)
    if chosen is None:
        return None
    dp_degree = data_parallel_degree(config, world_size)
    asked = settings_of(config)  # what the user set, before anything below replaces a value
    refuse_changes(chosen, asked)
    plan = plan_resume(chosen, config, world_size, dp_degree)
    if plan is not None:
        apply_plan(plan, config)
    seed_line = reuse_seed(chosen, config)
    lines = setting_changes(chosen, asked, plan)
    if seed_line:
        lines.append(seed_line)
    setattr(config, _REPORT, lines)
    return plan


def resume_report(config: Any) -> list[str]:
    """The lines ``adapt_to_checkpoint`` left on ``config``: one per changed setting and its fate."""
    return list(getattr(config, _REPORT, None) or [])


def already_done(found: StepFolder | None, steps: int) -> str | None:
    if found is not None and found.step >= steps:
        return (
            f"checkpoint {found.path} is at step {found.step}, at or past training.steps = {steps}: "
            f"the run is complete, nothing to train (raise --training.steps to train further)"
        )
    return None


# ---------------------------------------------------------------------------------------------
# The launcher's checks, once per pod before any worker starts


def prestart(
    config: Any, env: Mapping[str, str], world_size: int, dp_degree: int, say: Callable[[str], None] | None = None
) -> str | None:
    """Check the checkpoint folder before workers start, writing nothing (the launcher claims it with
    ``ownership.hold_folder`` once every check has passed). Returns a message when there is nothing to
    do (the run is complete); raises UserError for a foreign owner, an unwritable or full folder, or
    a resume that cannot continue at this size (``plan_resume``) or with these settings
    (``refuse_changes``). Every changed setting's fate (``resume_report``: applied, kept from the
    checkpoint, the reused seed) is said here, once per pod, with ``say`` (default: stderr, after
    ``[launch]``); the ranks do not repeat it. What the trainer does with the folder (skip an
    incomplete checkpoint, resume) rank 0 logs once, as it does it."""
    if not config.checkpoint.enable:
        return None
    folder = storage.checkpoint_dir(config)
    take_over = config.resilience.take_over_folder
    claim_folder(folder, env, take_over=take_over, write=False)  # a foreign owner is refused first
    check_writable(folder, create=False, keep_latest_k=getattr(config.checkpoint, "keep_latest_k", 0))
    found = scan(folder)
    chosen = choose(found, config.checkpoint.load_step, folder, bool(config.checkpoint.initial_load_path))
    if chosen is not None:
        refuse_changes(chosen, settings_of(config))
        plan_resume(chosen, config, world_size, dp_degree)  # raises when this size cannot continue it
        for line in resume_report(config):
            (say or _say)(line)
    return already_done(chosen, config.training.steps)


def _say(line: str) -> None:
    print(f"[launch] {line}", file=sys.stderr, flush=True)
