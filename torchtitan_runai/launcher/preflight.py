"""Preflight: will this job fit, and can this machine run it? Checked before torchrun starts.

Usage::

    python -m torchtitan_runai.preflight --config FILE [--nodes N] [--gpus-per-node G]
        [--gpu-memory-gib 79.6] [--here | --dry-run] [torchtitan overrides, e.g. --training.local_batch_size 2]

The launcher runs the same checks (``run_preflight``) once per pod, after parsing the config and
before torchrun. Each check gives a ``Finding`` (``ok``, ``warning`` or ``error``); the command
prints a short report and exits 2 when there is an error. Checks of the machine itself (free disk,
writable folder, host memory, /dev/shm, tokenizer cache and HF_TOKEN) judge it only when it is one
of the job's nodes: in the launcher inside a pod, or with ``--here`` (the CLI's default when this
machine has the job's GPUs per node). Elsewhere (a laptop, a dry run) they are notes that say what
was measured here and why that does not apply: the launcher checks every node again.

What is checked
---------------

``config``       the TOML against torchtitan's schema plus ours, and the values
                 (``job.parse_job_config``; a mistake there stops the command at once, exit 2);
``parallelism``  the parallel degrees against nodes x GPUs per node;
``memory``       an estimate of the peak GPU memory per rank against the GPU's memory (the visible
                 GPU's, ``--gpu-memory-gib``, else an H100 80GB; ``estimate_memory``, below). It is
                 an error only when the estimate exceeds the GPU by more than the estimator's
                 tolerance (10%), a warning when it is within it;
``checkpoint``   the checkpoint folder (``$OUTPUT_DIR/<checkpoint.folder>``, see
                 ``torchtitan_runai.storage``) is writable (a real file is created and removed, so a
                 read-only mount is caught even as root) and has room for the folder's peak:
                 ``checkpoint.keep_latest_k`` kept checkpoints plus the one being written (the
                 manager waits for the upload in flight before it stages the next save, so no
                 second one is in flight), less the complete ones already there that retention
                 keeps, counting as free what retention removes first
                 (``checkpoint.folder.peak_room``); one checkpoint is 12 bytes per parameter
                 (fp32 weights and AdamW's two moments), or the newest one on disk if larger.
                 ``keep_latest_k = 0`` keeps every checkpoint: room for the next one is checked;
``/dev/shm``     a warning when it is Docker's 64 MiB default: the dataloader workers and NCCL use
                 it (``--large-shm`` in Run:ai, an ``emptyDir: {medium: Memory}`` in a PyTorchJob);
``host memory``  with ``checkpoint.async_mode = "async_with_pinned_mem"``, every rank keeps its share of
                 the checkpoint in pinned host memory for the whole run (prepared at start,
                 ``torchtitan_runai.training.checkpoint.staging``): an error when the node's ranks together need more
                 than 80% of the container's memory limit (cgroup) or of the node's RAM, which would
                 otherwise end in the kernel's OOM killer with no message;
``tokenizer``    the tokenizer is in ``model.hf_assets_path`` or the Hub cache, or can be downloaded
                 (``hub.repo_id`` set, downloads allowed); nothing is downloaded here. The token is
                 looked up as the download does (``hub.token_source``: ``HF_TOKEN``, else the file
                 ``HF_TOKEN_PATH`` names) and the line says which it found, never the token; a Hub
                 download without one is a warning (Meta's repos are gated), a token file that
                 cannot be read or is empty an error.
``grace period``  will the preemption checkpoint fit in the time the workers get after SIGTERM?
                 (``check_grace_budget``, below; a warning, never an error).

The grace budget
----------------

When Kubernetes preempts a pod it sends SIGTERM and, ``terminationGracePeriodSeconds`` later,
SIGKILL. torchrun forwards the SIGTERM at once and itself SIGKILLs the workers after its kill
window: a fixed 30 s on torch <= 2.11 (NGC 25.12's 2.10, the GPU image's 2.11), whatever
``SHUTDOWN_TIMEOUT`` says; ``SHUTDOWN_TIMEOUT`` (``--shutdown_timeout``) on torch >= 2.13. The
workers' budget is the smaller of the two, less a few seconds for torchrun and the launcher to exit.

The facts: the pod's grace period comes from ``TERMINATION_GRACE_PERIOD_SECONDS``
(``storage.grace_period``: ``torchtitan_runai.manifest`` sets it to the spec's
``terminationGracePeriodSeconds``), else Kubernetes' default 30 s; the kill window of the installed
torchrun from ``torchrun_kill_window``. What a preemption costs in the worst case: the upload of
the interval checkpoint that had just started, then the preemption checkpoint, each a node's share
of the checkpoint (12 bytes per parameter / nodes) at the write speed of the checkpoint folder,
measured here by a short probe (``probe_write_speed``: ``checkpoint_perf.writer_threads`` files of
4 MiB written in parallel and fsynced, then removed), plus a few seconds for the step in flight.
When that exceeds the budget the launcher prints one warning with the fixes. Every preemption also
logs what it took: ``preemption: signal -> step N checkpoint marked in X s (...)``.

The memory estimate (``estimate_memory``) is ``torchtitan_runai.memory_estimate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torchtitan_runai import hub, model_lookup, storage
from torchtitan_runai.checkpoint.folder import existing_ancestor, peak_room, probe_writable
from torchtitan_runai.checkpoint.resume import adapt_to_checkpoint
from torchtitan_runai.config import Hub, check_world_size, wants_pinned_staging
from torchtitan_runai.errors import UserError, cli
from torchtitan_runai.inputs import tokenizer_files
from torchtitan_runai.job import parse_job_config
from torchtitan_runai.launcher.memory_estimate import (
    GIB,
    MemoryEstimate,
    TrainSettings,
    estimate_memory,
    format_estimate,
)
from torchtitan_runai.storage import BYTES_PER_PARAM_FULL_CHECKPOINT

DEFAULT_GPU_MEMORY_GIB = 79.6
"""An H100 80GB: 81,559 MiB as nvidia-smi reports it; assumed when no GPU is visible."""

FIT_TOLERANCE = 0.10
"""The estimator's measured accuracy; beyond it a miss is an error, within it a warning."""

SHM_DEFAULT_BYTES = 64 * 1024**2

# ---------------------------------------------------------------------------------------------
# Fit


@dataclass(frozen=True)
class Finding:
    """One check's outcome."""

    level: str
    """"ok", "warning", "error", "note" (a measurement of a machine that is not the job's) or "info"."""
    check: str
    message: str


def _advice(estimate: MemoryEstimate, settings: TrainSettings | None) -> str:
    biggest = estimate.biggest
    s = settings or TrainSettings()
    if biggest == "activations":
        if s.ac_mode != "full":
            return (
                'set activation_checkpoint.mode = "full" (or selective_ac_option = "op"), lower '
                "training.local_batch_size, or raise parallelism.tensor_parallel_degree"
            )
        return "lower training.local_batch_size or training.seq_len, or raise parallelism.tensor_parallel_degree"
    if biggest == "logits":
        return (
            "lower training.local_batch_size, or raise parallelism.tensor_parallel_degree (the loss is "
            "sharded with loss parallel); enable compile to fuse the loss"
        )
    if biggest in ("parameters", "gradients", "optimizer", "weights in flight"):
        return (
            "shard the model over more GPUs: more nodes with data_parallel_shard_degree = -1 (FSDP), or raise "
            "parallelism.tensor_parallel_degree / pipeline_parallel_degree"
        )
    return "lower training.local_batch_size"


def check_fit(estimate: MemoryEstimate, gpu_memory_gib: float, settings: TrainSettings | None = None) -> Finding:
    """Does the estimate fit in ``gpu_memory_gib``? The message names the biggest consumer and a fix."""
    total = estimate.total_gib
    share = estimate.breakdown[estimate.biggest]
    head = (
        f"estimated peak {total:.1f} GiB per GPU of {gpu_memory_gib:.1f} GiB (at the {estimate.moment}); "
        f"biggest consumer: {estimate.biggest} {share:.1f} GiB"
    )
    if total > gpu_memory_gib * (1 + FIT_TOLERANCE):
        return Finding("error", "memory", f"does not fit: {head}. Fix: {_advice(estimate, settings)}")
    if total > gpu_memory_gib * (1 - FIT_TOLERANCE):
        return Finding(
            "warning",
            "memory",
            f"may not fit (within the estimator's ±10%): {head}. "
            f"If it runs out of memory: {_advice(estimate, settings)}",
        )
    return Finding("ok", "memory", f"fits: {head}")


# ---------------------------------------------------------------------------------------------
# Environment checks


def check_checkpoint_folder(path: str | os.PathLike, checkpoint_bytes: int, keep_latest_k: int = 0) -> Finding:
    """The folder (or the nearest existing parent, where it will be created) takes a real file and has
    room for its peak (``peak_room``: ``keep_latest_k`` + 1 checkpoints of ``checkpoint_bytes``, less
    what is on disk and kept). Nothing is left behind."""
    folder = Path(path)
    where = existing_ancestor(folder)
    setting = "checkpoint folder (OUTPUT_DIR / checkpoint.folder)"
    if not where.is_dir():
        return Finding(
            "error",
            "checkpoint",
            f"{setting} {folder}: {where} is not a folder. Fix: point OUTPUT_DIR at the PVC mount path",
        )
    try:
        probe_writable(where)
    except OSError as error:
        return Finding(
            "error",
            "checkpoint",
            f"{setting} {folder} is not writable ({error.strerror} in {where}). "
            "Fix: mount a writable PVC at OUTPUT_DIR (readOnly: false) and check "
            "its permissions for the container's user (fsGroup)",
        )
    peak = peak_room(folder, checkpoint_bytes, keep_latest_k)
    free = shutil.disk_usage(where).free
    gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    if keep_latest_k > 0:
        made_of = (
            f"{peak.count} checkpoints of {gib(peak.checkpoint_bytes)} (checkpoint.keep_latest_k = "
            f"{keep_latest_k} kept + 1 being written"
            + (f"; {peak.on_disk} of them already on disk)" if peak.on_disk else ")")
        )
    else:
        made_of = (
            f"1 checkpoint of {gib(peak.checkpoint_bytes)} (checkpoint.keep_latest_k = 0 keeps every "
            "checkpoint: the folder grows by one each checkpoint.interval)"
        )
    freed = f" (+ {gib(peak.freeable_bytes)} that retention removes first)" if peak.freeable_bytes else ""
    if free + peak.freeable_bytes < peak.needed_bytes:
        return Finding(
            "error",
            "checkpoint",
            f"{setting} {folder}: {gib(free)} free{freed}, the folder's peak needs "
            f"{gib(peak.needed_bytes)} ({peak.needed_bytes} bytes) more: {made_of}. "
            "Fix: use a larger PVC, free space, or lower checkpoint.keep_latest_k "
            f"(each one less needs {gib(peak.checkpoint_bytes)} less)",
        )
    return Finding(
        "ok",
        "checkpoint",
        f"{folder} writable, {gib(free)} free{freed}; the peak needs {gib(peak.needed_bytes)} more: {made_of}",
    )


def check_dev_shm(path: str = "/dev/shm") -> Finding:
    """A warning when shared memory is Docker's 64 MiB default (or smaller, or missing)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return Finding(
            "warning",
            "/dev/shm",
            f"{path} is missing: dataloader workers and NCCL need shared memory. "
            "Fix: runai --large-shm, or an emptyDir medium: Memory at /dev/shm",
        )
    size = st.f_blocks * st.f_frsize
    if size <= SHM_DEFAULT_BYTES:
        return Finding(
            "warning",
            "/dev/shm",
            f"{path} is {size / 1024**2:.0f} MiB (the container default): NCCL and "
            "dataloader workers can fail with bus errors. Fix: runai --large-shm, "
            "docker --shm-size=16g, or an emptyDir {medium: Memory} at /dev/shm",
        )
    return Finding("ok", "/dev/shm", f"{size / 1024**3:.1f} GiB")


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
HOST_MEMORY_SHARE = 0.8  # of the limit, for pinned staging; the rest is Python, dataloaders, NCCL


def host_memory_limit(
    cgroup_files: tuple[str, ...] = CGROUP_LIMITS, meminfo: str = "/proc/meminfo"
) -> tuple[int | None, str]:
    """The smaller of the container's cgroup memory limit and the node's RAM, and where it came from."""
    found: list[tuple[int, str]] = []
    for path in cgroup_files:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" / a huge number: no limit
            found.append((int(text), f"the container's memory limit ({path})"))
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemTotal:"):
                found.append((int(line.split()[1]) * 1024, "the node's RAM"))
    except (OSError, ValueError, IndexError):
        pass
    return min(found) if found else (None, "unknown")


def check_host_memory(
    config: Any, params: int, world_size: int, local_ranks: int, limit: tuple[int | None, str] | None = None
) -> Finding | None:
    """Pinned checkpoint staging holds each rank's share of the checkpoint in host RAM."""
    if not wants_pinned_staging(config.checkpoint):
        return None
    replicas = max(int(config.parallelism.data_parallel_replicate_degree), 1)
    need = BYTES_PER_PARAM_FULL_CHECKPOINT * params * replicas / max(world_size, 1) * local_ranks
    limit_bytes, source = limit or host_memory_limit()
    summary = f"pinned checkpoint staging holds {need / 1e9:.1f} GB per node ({local_ranks} ranks)"
    if limit_bytes is None:
        return Finding("ok", "host memory", summary + " (limit unknown)")
    if need > HOST_MEMORY_SHARE * limit_bytes:
        raise_limit = "raise the pod's memory limit, " if "limit" in source else ""
        return Finding(
            "error",
            "host memory",
            f"{summary}, more than {HOST_MEMORY_SHARE:.0%} of {source}, "
            f"{limit_bytes / 1e9:.1f} GB. Fix: {raise_limit}use more nodes "
            "(each rank's share shrinks), or set [checkpoint] async_mode = "
            '"async" (no pinned memory, longer checkpoint stalls)',
        )
    return Finding("ok", "host memory", f"{summary}, {source}: {limit_bytes / 1e9:.0f} GB")


def check_tokenizer(config: Any, env: Mapping[str, str] | None = None) -> Finding:
    """Present locally or in the Hub cache, or downloadable; never downloads."""
    env = os.environ if env is None else env
    hub_section = getattr(config, "hub", None) or Hub()
    assets_path = config.model.hf_assets_path
    try:
        if assets_path:
            folder = Path(assets_path).expanduser()
            if folder.is_dir() and tokenizer_files.find_tokenizer_files(folder, hub_section.tokenizer_format):
                return Finding("ok", "tokenizer", f"in {folder}")
        if not hub_section.repo_id:
            tokenizer_files.resolve_tokenizer(assets_path, hub_section, Path("."))  # raises the usual message
        cache = hub.resolve_cache_dir(hub_section, config.job.dump_folder)
        if cache.is_dir() and tokenizer_files.cached_tokenizer(hub_section, cache) is not None:
            return Finding("ok", "tokenizer", f"{hub_section.repo_id} in the Hub cache {cache}")
    except UserError as error:
        return Finding("error", "tokenizer", error.line())
    offline = hub.offline(env)
    if offline or not hub_section.allow_download:
        setting = "HF_HUB_OFFLINE" if offline else "hub.allow_download = false"
        return Finding(
            "error",
            "tokenizer",
            f"{setting}: the tokenizer of {hub_section.repo_id} is not in the cache {cache}. "
            "Fix: stage it (python -m torchtitan_runai.stage --config FILE) or point "
            "hub.cache_dir / HF_HUB_CACHE at the staged cache",
        )
    try:  # the download's own lookup (HF_TOKEN, else the file HF_TOKEN_PATH names): its source, never the token
        source = hub.token_source(env)
    except UserError as error:
        return Finding("error", "tokenizer", error.line())
    if source is None:
        return Finding(
            "warning",
            "tokenizer",
            f"will download {hub_section.repo_id} without a token (neither HF_TOKEN nor HF_TOKEN_PATH is set): "
            "gated repos (meta-llama) answer 401. Fix: pass HF_TOKEN from a Secret, or mount the Secret and "
            "set HF_TOKEN_PATH to its file",
        )
    return Finding("ok", "tokenizer", f"will download {hub_section.repo_id} into {cache} (token from {source})")


# ---------------------------------------------------------------------------------------------
# The grace budget (module docstring)

TORCHRUN_FIXED_KILL_S = 30  # torch <= 2.11: LocalElasticAgent._shutdown -> pcontext.close(timeout=30)
EXIT_MARGIN_S = 3  # torchrun and the launcher exiting after the workers
STEP_MARGIN_S = 5  # the step in flight when the signal comes, and the ranks agreeing on the boundary
PROBE_BYTES_PER_THREAD = 4 << 20


def torchrun_kill_window(shutdown_timeout: int) -> tuple[int, str]:
    """(seconds from SIGTERM to torchrun's SIGKILL of the workers, why) for the installed torch."""
    if torchrun_supports("--shutdown_timeout"):
        return shutdown_timeout, f"SHUTDOWN_TIMEOUT={shutdown_timeout}"
    return TORCHRUN_FIXED_KILL_S, f"this torchrun's fixed {TORCHRUN_FIXED_KILL_S} s (it has no --shutdown_timeout)"


def probe_write_speed(folder: str | os.PathLike, threads: int, bytes_per_thread: int = PROBE_BYTES_PER_THREAD) -> float:
    """Bytes/s of ``threads`` files written in parallel into ``folder`` and fsynced (then removed),
    the way DCP's writer threads write a checkpoint."""
    folder = existing_ancestor(Path(folder))  # nothing is created
    block = os.urandom(1 << 20)
    paths = [folder / f".write-speed-probe-{os.getpid()}-{i}" for i in range(threads)]

    def write(path: Path) -> None:
        with open(path, "wb") as f:
            for _ in range(max(1, bytes_per_thread >> 20)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())

    began = time.perf_counter()
    workers = [threading.Thread(target=write, args=(path,)) for path in paths]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        took = time.perf_counter() - began
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return threads * max(1, bytes_per_thread >> 20) * (1 << 20) / max(took, 1e-6)


@dataclass(frozen=True)
class GraceBudget:
    """What a preemption needs against what the workers get (seconds)."""

    grace_s: int
    grace_source: str
    kill_window_s: int
    kill_source: str
    node_bytes: float
    write_bps: float

    @property
    def budget_s(self) -> float:
        return min(self.grace_s - EXIT_MARGIN_S, self.kill_window_s)

    @property
    def save_s(self) -> float:
        return self.node_bytes / self.write_bps

    @property
    def needed_s(self) -> float:
        """Worst case: the upload that had just started, then the preemption save, then the step."""
        return 2 * self.save_s + STEP_MARGIN_S


def check_grace_budget(b: GraceBudget, folder: str) -> Finding:
    what = (
        f"a preemption needs up to {b.needed_s:.0f} s (the upload in flight, then the preemption checkpoint: "
        f"2 x {b.node_bytes / 1e9:.1f} GB per node at {b.write_bps / 1e9:.2f} GB/s measured in {folder}, "
        f"+ {STEP_MARGIN_S} s for the step in flight); the workers get {b.budget_s:.0f} s (grace period "
        f"{b.grace_s} s from {b.grace_source}; torchrun kills them after {b.kill_source})"
    )
    if b.needed_s <= b.budget_s:
        return Finding("ok", "grace period", what)
    fixes = [
        f"raise the pod's terminationGracePeriodSeconds to {int(b.needed_s + EXIT_MARGIN_S + 10)} "
        f"(python -m torchtitan_runai.manifest --grace-period; it passes {storage.GRACE_PERIOD_ENV})"
    ]
    if b.kill_window_s < b.needed_s:
        fixes.append(
            "on torch >= 2.13 set SHUTDOWN_TIMEOUT below it (older torchrun always kills after 30 s)"
            if "fixed" in b.kill_source
            else "raise SHUTDOWN_TIMEOUT (keep it below the grace period)"
        )
    fixes.append("write checkpoints to faster storage or raise checkpoint_perf.writer_threads")
    fixes.append("spread the job over more nodes (each writes a smaller share)")
    return Finding(
        "warning",
        "grace period",
        f"{what}, so a preemption checkpoint may be cut off (it is then "
        "skipped at restart and the steps since the last complete checkpoint "
        f"are lost). Fix: {'; '.join(fixes)}",
    )


def grace_budget(
    config: Any,
    params: int,
    world_size: int,
    local_ranks: int,
    env: Mapping[str, str],
    shutdown_timeout: int,
    folder: str,
) -> GraceBudget:
    grace, source = storage.grace_period(env)
    kill, kill_source = torchrun_kill_window(shutdown_timeout)
    perf = getattr(config, "checkpoint_perf", None)
    threads = perf.writer_threads if perf is not None else 1
    nodes = max(1, world_size // max(local_ranks, 1))
    return GraceBudget(
        grace,
        source,
        kill,
        kill_source,
        BYTES_PER_PARAM_FULL_CHECKPOINT * params / nodes,
        probe_write_speed(folder, threads),
    )


def check_layout(
    config: Any, world_size: int, gpu_memory_gib: float | None
) -> tuple[list[Finding], MemoryEstimate | None]:
    """The job's shape against its config, the checks every command makes the same way (the launcher
    and this command through ``run_preflight``, ``torchtitan_runai.manifest`` before it writes a spec):
    the parallel degrees tile ``world_size`` GPUs (``config.check_world_size``), and the memory estimate
    fits ``gpu_memory_gib`` (None: an H100 80GB is assumed, and the message says so). Returns the
    findings (``parallelism``, then ``memory``) and the estimate (None when the degrees do not tile)."""
    try:
        check_world_size(config, world_size)
    except UserError as error:
        return [Finding("error", "parallelism", error.line())], None
    findings = [Finding("ok", "parallelism", f"degrees tile {world_size} GPU(s)")]
    settings = TrainSettings.from_config(config, world_size)
    estimate = estimate_memory(model_lookup.model_args(config), settings)
    fit = check_fit(estimate, gpu_memory_gib or DEFAULT_GPU_MEMORY_GIB, settings)
    if not gpu_memory_gib and fit.level != "ok":
        fit = dataclasses.replace(
            fit, message=fit.message + " (no GPU visible: assumed an H100 80GB; pass --gpu-memory-gib)"
        )
    return [*findings, fit], estimate


NOT_HERE = "this machine, not a node of the job (the launcher checks each pod itself): "


def elsewhere(finding: Finding) -> Finding:
    """A check of this machine, made where the job does not run: a note of what was measured."""
    return dataclasses.replace(finding, level="note", message=NOT_HERE + finding.message.split(" Fix: ")[0])


def run_preflight(
    config: Any,
    world_size: int,
    gpu_memory_gib: float | None,
    dry_run: bool = False,
    env: Mapping[str, str] | None = None,
    shm_path: str = "/dev/shm",
    local_ranks: int | None = None,
    host_limit: tuple[int | None, str] | None = None,
    tokenizer_check: bool = True,
    shutdown_timeout: int | None = None,
    here: bool | None = None,
) -> list[Finding]:
    """Every check for a parsed config.
    ``tokenizer_check=False``: the caller ran ``check_tokenizer`` already (the launcher does, first).

    ``here``: this machine is one of the job's nodes (default: not in a dry run). When it is not,
    the checks of this machine (checkpoint folder and disk, host memory, /dev/shm, tokenizer cache
    and HF_TOKEN) are notes of what was measured (``elsewhere``), never errors or warnings: a
    laptop's disk is not the PVC. The memory fit is judged against the job's GPU either way (a
    warning in a dry run, whose GPU is often assumed).
    """
    here = not dry_run if here is None else here
    env = os.environ if env is None else env
    findings, estimate = check_layout(config, world_size, gpu_memory_gib)
    if estimate is None:
        return findings  # the estimate needs valid degrees
    settings = TrainSettings.from_config(config, world_size)
    if dry_run and findings[-1].level == "error":  # the GPU of a dry run is often assumed, not the job's
        findings[-1] = dataclasses.replace(findings[-1], level="warning")
    machine: list[Finding] = []
    # the config's own: OUTPUT_DIR is applied to it before the checks (storage.apply_output_dir)
    folder = storage.checkpoint_folder_path(config.job.dump_folder, config.checkpoint.folder)
    if config.checkpoint.enable:
        machine.append(
            check_checkpoint_folder(
                folder, BYTES_PER_PARAM_FULL_CHECKPOINT * estimate.params, config.checkpoint.keep_latest_k
            )
        )
    host = check_host_memory(config, estimate.params, world_size, local_ranks or world_size, host_limit)
    if host is not None:
        machine.append(host)
    if tokenizer_check:
        machine.append(check_tokenizer(config, env))
    machine.append(check_dev_shm(shm_path))
    machine_ok = not any(f.level == "error" for f in machine)
    findings.extend(machine if here else [elsewhere(f) for f in machine])
    if config.checkpoint.enable and here and machine_ok:  # the probe writes into the job's own folder
        budget = grace_budget(
            config,
            estimate.params,
            world_size,
            local_ranks or world_size,
            env,
            storage.default_shutdown_timeout(env) if shutdown_timeout is None else shutdown_timeout,
            folder,
        )
        findings.append(check_grace_budget(budget, folder))
    findings.append(Finding("info", "estimate", format_estimate(estimate, settings)))
    return findings


def enforce(findings: list[Finding], warn: Callable[[str], None] | None = None) -> None:
    """For the launcher: print every warning through ``warn``; raise the first error as the one
    line a user error gets (printed once, at the CLI edge)."""
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    for f in findings:
        if f.level in ("warning", "note"):
            warn(f"[preflight] {f.level}: {f.check}: {f.message}")
    error = next((f for f in findings if f.level == "error"), None)
    if error is not None:
        why, _, fix = error.message.partition(" Fix: ")
        raise UserError(f"preflight {error.check}", None, why.rstrip("."), fix or "see the preflight lines above")


def report(findings: list[Finding]) -> str:
    out = []
    for f in findings:
        if f.level == "info":
            out.append(f.message)
        else:
            out.append(f"[{f.level:>7}] {f.check}: {f.message}")
    return "\n".join(out)


def detect_gpu_memory_gib() -> float | None:
    """The smallest GPU's memory, from nvidia-smi: the launcher lives as long as the job, and asking
    torch would create a CUDA context on GPU 0 that the job's rank 0 then pays for."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        mib = [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):  # no driver tools: skip the fit check
        return None
    return min(mib) * 2**20 / GIB if mib else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_runai.preflight", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the TOML recipe")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default: visible GPUs, else 8")
    parser.add_argument(
        "--gpu-memory-gib", type=float, default=None, help="default: the visible GPU's, else 79.6 (H100 80GB)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--here",
        action="store_true",
        default=None,
        help="this machine is one of the job's nodes: judge its disk, memory, /dev/shm and "
        "tokenizer (default: only when it has the GPUs per node the job asks for)",
    )
    where.add_argument(
        "--dry-run", action="store_true", help="this machine is not one of the job's nodes: its measurements are notes"
    )
    args, overrides = parser.parse_known_args(argv)
    for name in ("nodes", "gpus_per_node"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}", value, "must be at least 1", "pass a positive count")
    gpu_memory = args.gpu_memory_gib or detect_gpu_memory_gib()
    gpus = args.gpus_per_node
    if gpus is None:
        gpus = visible_gpus() or 8
    world_size = args.nodes * gpus
    train_args = ["--job.config_file", args.config, *overrides]
    config = parse_job_config(train_args)
    config, _, _ = storage.apply_output_dir(config, train_args, dict(os.environ), parse_job_config)  # as launch does
    # an existing checkpoint folder at another node count: the batch its resume will run with
    plan = adapt_to_checkpoint(config, world_size)
    visible = visible_gpus()
    here = args.here if args.here else (not args.dry_run and visible > 0 and visible >= gpus)
    findings = run_preflight(config, world_size, gpu_memory, dry_run=args.dry_run, local_ranks=gpus, here=here)
    print(
        f"preflight: {args.config}, {args.nodes} node(s) x {gpus} GPU(s)"
        + ("" if here else f"; this machine ({visible} GPU(s)) is not one of the job's nodes (--here if it is)")
    )
    if plan is not None and plan.changed:
        print(f"preflight: {plan.line()}")
    print(report(findings))
    return 2 if any(f.level == "error" for f in findings) else 0


# ---------------------------------------------------------------------------------------------
# What the installed torch offers: imported here, when asked, never at module level (the
# launcher-import test in tests/unit/launcher/test_launch.py says why)


def visible_gpus() -> int:
    """The GPUs this process sees (the launcher's default processes per node, and whether this machine
    is one of the job's nodes); 0 where torch cannot tell: this package does not depend on torch, and a
    laptop runs ``python -m torchtitan_runai.preflight`` without it."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def torchrun_supports(flag: str) -> bool:
    """Whether the installed torchrun takes ``flag`` (``--shutdown_timeout`` exists from torch 2.13)."""
    from torch.distributed.run import get_args_parser

    return flag in get_args_parser()._option_string_actions


def entry() -> None:
    cli(main, prog="preflight")
