"""Which checkpoint a job resumes from, and whether it may.

The policy, in one place:

- which one: ``choose``: ``checkpoint.load_step`` when set (it must exist and be complete), else the
  newest *resumable* one (complete and ``full``: ``checkpoint.folder``); newer incomplete ones are
  skipped (the trainer moves them to ``.incomplete/``), newer model-only ones are skipped with a note;
  a folder whose only complete checkpoints are model-only (stock's final save) stops with how to
  continue from those weights (``checkpoint.initial_load_path``) instead of silently starting over;
  a stock checkpoint without our marker is adopted (``checkpoint.folder``) and said so;
- whether it may: a changed data-parallel degree cannot restore the per-rank data positions
  (``world_size_error``: stop, with how to proceed); changed schedule settings resume with loud,
  concrete warnings (``schedule_changes``); a checkpoint at or past ``training.steps`` means there is
  nothing to train (``already_done``: the launcher exits 0).

``prestart`` is the launcher's check, once per pod before any worker starts; the trainer's
``RunaiCheckpointManager.choose`` applies the same ``choose`` on rank 0 when it loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torchtitan_runai import storage
from torchtitan_runai.checkpoint.folder import StepFolder, check_writable, newest_resumable, scan
from torchtitan_runai.checkpoint.ownership import claim_folder
from torchtitan_runai.errors import UserError

SCHEDULE_KEYS = (
    "training.steps",
    "lr_scheduler.warmup_steps",
    "lr_scheduler.total_steps",
    "lr_scheduler.decay_ratio",
    "lr_scheduler.decay_type",
    "lr_scheduler.min_lr_factor",
)


def choose(found: list[StepFolder], load_step: int, folder: Path, initial_load: bool = False) -> StepFolder | None:
    """The checkpoint to resume from among ``found`` (``scan``, newest first); None: start fresh.

    ``load_step >= 0`` names one, which must exist and be complete (UserError otherwise); else the
    newest resumable one. With none resumable but a complete model-only one (and no
    ``initial_load``): UserError pointing to ``checkpoint.initial_load_path``."""
    if load_step < 0:
        chosen = newest_resumable(found)
        weights = next((f for f in found if f.complete and not f.resumable), None)
        if chosen is None and weights is not None and not initial_load:
            raise model_only_error(weights)
        return chosen
    chosen = next((f for f in found if f.step == load_step), None)
    if chosen is None or not chosen.complete:
        raise UserError("checkpoint.load_step", load_step,
                        f"{folder}/step-{load_step} " + ("does not exist" if chosen is None else f"is incomplete ({chosen.why})"),
                        "pick a complete step-N folder, or unset checkpoint.load_step to resume from the newest")
    return chosen


def model_only_error(found: StepFolder) -> UserError:
    return UserError(
        "checkpoint.folder", str(found.path.parent),
        f"its newest complete checkpoint {found.path.name} holds model weights only (no optimizer or train "
        "state; stock torchtitan's final save), so it cannot be resumed",
        f"continue from its weights in a new folder: --checkpoint.folder <new> --checkpoint.initial_load_path "
        f"{found.path} --checkpoint.initial_load_model_only (optimizer state and data position start afresh), "
        "or move it away to start over")


def model_only_note(found: StepFolder) -> str:
    return (f"skipping {found.path}: a model-only checkpoint cannot be resumed (to start a run from its weights: "
            f"--checkpoint.initial_load_path {found.path} --checkpoint.initial_load_model_only)")


def adoption_note(found: StepFolder) -> str:
    return (f"adopted {found.path}: a complete checkpoint without this fork's completion marker (stock "
            "torchtitan's): .metadata readable, every shard as long as it says, model, optimizer and train "
            "state present")


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
    lines = [f"resume from step {step} with changed schedule settings: {what}"]
    old_total, new_total = _total(old), _total(new)
    if old_total != new_total:
        lines.append(
            f"the learning-rate schedule is recomputed over {new_total} steps instead of {old_total}: "
            f"its decay now ends at step {new_total} (was {old_total}), so every step after {step} "
            "trains with a different learning rate than the original run planned; "
            f"to keep the original schedule pass --lr_scheduler.total_steps {old_total}")
    if old.get("lr_scheduler.warmup_steps") != new.get("lr_scheduler.warmup_steps"):
        lines.append(f"warmup now ends at step {new.get('lr_scheduler.warmup_steps')} "
                     f"(was {old.get('lr_scheduler.warmup_steps')})")
    if old.get("training.steps") != new.get("training.steps"):
        lines.append(f"training now stops at step {new.get('training.steps')} (was {old.get('training.steps')})")
    return lines


def world_size_error(found: StepFolder, world_size: int, dp_degree: int) -> UserError | None:
    """A changed data-parallel degree cannot resume exactly: stop with how to proceed."""
    rec = found.record or {}
    old_dp, old_ws = rec.get("dp_degree"), rec.get("world_size") or "unknown"
    if old_dp is None or old_dp == dp_degree:
        return None
    return UserError(
        "world size", f"{old_ws} -> {world_size}",
        f"{found.path} was written by {old_dp} data-parallel rank(s) (world size {old_ws}); this run has "
        f"{dp_degree} (world size {world_size}), so the per-rank data positions cannot be restored",
        f"run with the original node/GPU count (world size {old_ws}), or continue from its weights in a new folder: "
        f"--checkpoint.folder <new> --checkpoint.initial_load_path {found.path} --checkpoint.initial_load_model_only "
        "(optimizer state and data position start afresh)")


def already_done(found: StepFolder | None, steps: int) -> str | None:
    if found is not None and found.step >= steps:
        return (f"checkpoint {found.path} is at step {found.step}, at or past training.steps = {steps}: "
                f"the run is complete, nothing to train (raise --training.steps to train further)")
    return None



# ---------------------------------------------------------------------------------------------
# The launcher's checks, once per pod before any worker starts


def prestart(config: Any, env: Mapping[str, str], world_size: int, dp_degree: int) -> str | None:
    """Check the checkpoint folder before workers start, writing nothing (the launcher claims it with
    ``ownership.hold_folder`` once every check has passed). Returns a message when there is nothing to
    do (the run is complete); raises UserError for a foreign owner, an unwritable or full folder, or
    a changed data-parallel degree. What the trainer will do with the folder (skip an incomplete
    checkpoint, resume, warn about a changed schedule) rank 0 logs once, as it does it."""
    if not config.checkpoint.enable:
        return None
    folder = storage.checkpoint_dir(config)
    take_over = config.resilience.take_over_folder
    claim_folder(folder, env, take_over=take_over, write=False)  # a foreign owner is refused first
    check_writable(folder, create=False)
    found = scan(folder)
    chosen = choose(found, config.checkpoint.load_step, folder, bool(config.checkpoint.initial_load_path))
    if chosen is not None:
        error = world_size_error(chosen, world_size, dp_degree)
        if error is not None:
            raise error
    return already_done(chosen, config.training.steps)
