"""Preflight: will this job fit, and can this machine run it? Checked before torchrun starts.

Usage::

    python -m torchtitan_runai.preflight --config FILE [--nodes N] [--gpus-per-node G]
        [--gpu-memory-gib 79.6] [--dry-run] [torchtitan overrides, e.g. --training.local_batch_size 2]

The launcher runs the same checks (``run_preflight``) once per pod, after parsing the config and
before torchrun. Each check gives a ``Finding`` (``ok``, ``warning`` or ``error``); the command
prints a short report and exits 2 when there is an error. Checks that depend on the machine (free
disk, writable folder, tokenizer files) are errors in a real launch and warnings in a dry run
(``--dry-run``), where the machine is usually not the one that will train.

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
                 read-only mount is caught even as root) and has room for one full checkpoint
                 (12 bytes per parameter: fp32 weights and AdamW's two moments);
``/dev/shm``     a warning when it is Docker's 64 MiB default: the dataloader workers and NCCL use
                 it (``--large-shm`` in Run:ai, an ``emptyDir: {medium: Memory}`` in a PyTorchJob);
``host memory``  with ``checkpoint.async_mode = "async_with_pinned_mem"``, every rank keeps its share of
                 the checkpoint in pinned host memory for the whole run (prepared at start,
                 ``torchtitan_runai.checkpoint.staging``): an error when the node's ranks together need more
                 than 80% of the container's memory limit (cgroup) or of the node's RAM, which would
                 otherwise end in the kernel's OOM killer with no message;
``tokenizer``    the tokenizer is in ``model.hf_assets_path`` or the Hub cache, or can be downloaded
                 (``hub.repo_id`` set, downloads allowed); nothing is downloaded here. A Hub
                 download without ``HF_TOKEN`` is a warning: Meta's repos are gated.

The memory estimate (``estimate_memory``) is ``torchtitan_runai.memory_estimate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torchtitan_runai import hub, storage
from torchtitan_runai.checkpoint.folder import lacks_room, probe_writable
from torchtitan_runai.checkpoint.staging import wants_pinned_staging
from torchtitan_runai.config import Hub, check_world_size
from torchtitan_runai.errors import UserError, cli
from torchtitan_runai.job import parse_job_config
from torchtitan_runai.training import spec, tokenizer
from torchtitan_runai.memory_estimate import (
    BYTES_PER_PARAM_FULL_CHECKPOINT,
    GIB,
    MemoryEstimate,
    TrainSettings,
    estimate_memory,
    format_estimate,
)

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
    """"ok", "warning" or "error"."""
    check: str
    message: str


def _advice(estimate: MemoryEstimate, settings: TrainSettings | None) -> str:
    biggest = estimate.biggest
    s = settings or TrainSettings()
    if biggest == "activations":
        if s.ac_mode != "full":
            return ('set activation_checkpoint.mode = "full" (or selective_ac_option = "op"), lower '
                    "training.local_batch_size, or raise parallelism.tensor_parallel_degree")
        return "lower training.local_batch_size or training.seq_len, or raise parallelism.tensor_parallel_degree"
    if biggest == "logits":
        return ("lower training.local_batch_size, or raise parallelism.tensor_parallel_degree (the loss is "
                "sharded with loss parallel); enable compile to fuse the loss")
    if biggest in ("parameters", "gradients", "optimizer", "weights in flight"):
        return ("shard the model over more GPUs: more nodes with data_parallel_shard_degree = -1 (FSDP), or raise "
                "parallelism.tensor_parallel_degree / pipeline_parallel_degree")
    return "lower training.local_batch_size"


def check_fit(estimate: MemoryEstimate, gpu_memory_gib: float, settings: TrainSettings | None = None) -> Finding:
    """Does the estimate fit in ``gpu_memory_gib``? The message names the biggest consumer and a fix."""
    total = estimate.total_gib
    share = estimate.breakdown[estimate.biggest]
    head = (f"estimated peak {total:.1f} GiB per GPU of {gpu_memory_gib:.1f} GiB (at the {estimate.moment}); "
            f"biggest consumer: {estimate.biggest} {share:.1f} GiB")
    if total > gpu_memory_gib * (1 + FIT_TOLERANCE):
        return Finding("error", "memory", f"does not fit: {head}. Fix: {_advice(estimate, settings)}")
    if total > gpu_memory_gib * (1 - FIT_TOLERANCE):
        return Finding("warning", "memory", f"may not fit (within the estimator's ±10%): {head}. "
                                            f"If it runs out of memory: {_advice(estimate, settings)}")
    return Finding("ok", "memory", f"fits: {head}")


# ---------------------------------------------------------------------------------------------
# Environment checks


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_checkpoint_folder(path: str | os.PathLike, needed_bytes: int) -> Finding:
    """The folder (or the nearest existing parent, where it will be created) takes a real file and has
    ``needed_bytes`` free. Nothing is left behind."""
    folder = Path(path)
    where = _existing_ancestor(folder)
    setting = "checkpoint folder (OUTPUT_DIR / checkpoint.folder)"
    if not where.is_dir():
        return Finding("error", "checkpoint", f"{setting} {folder}: {where} is not a folder. Fix: point OUTPUT_DIR "
                                              "at the PVC mount path")
    try:
        probe_writable(where)
    except OSError as error:
        return Finding("error", "checkpoint", f"{setting} {folder} is not writable ({error.strerror} in {where}). "
                                              "Fix: mount a writable PVC at OUTPUT_DIR (readOnly: false) and check "
                                              "its permissions for the container's user (fsGroup)")
    free = lacks_room(where, needed_bytes)
    if free is not None:
        return Finding("error", "checkpoint", f"{setting} {folder}: {free / 1e9:.1f} GB free, one checkpoint needs "
                                              f"{needed_bytes / 1e9:.1f} GB. Fix: use a larger PVC, free space, or "
                                              "lower checkpoint.keep_latest_k")
    free = shutil.disk_usage(where).free
    return Finding("ok", "checkpoint", f"{folder} writable, {free / 1e9:.0f} GB free "
                                       f"(one checkpoint: {needed_bytes / 1e9:.1f} GB)")


def check_dev_shm(path: str = "/dev/shm") -> Finding:
    """A warning when shared memory is Docker's 64 MiB default (or smaller, or missing)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return Finding("warning", "/dev/shm", f"{path} is missing: dataloader workers and NCCL need shared memory. "
                                              "Fix: runai --large-shm, or an emptyDir medium: Memory at /dev/shm")
    size = st.f_blocks * st.f_frsize
    if size <= SHM_DEFAULT_BYTES:
        return Finding("warning", "/dev/shm", f"{path} is {size / 1024**2:.0f} MiB (the container default): NCCL and "
                                              "dataloader workers can fail with bus errors. Fix: runai --large-shm, "
                                              "docker --shm-size=16g, or an emptyDir {medium: Memory} at /dev/shm")
    return Finding("ok", "/dev/shm", f"{size / 1024**3:.1f} GiB")


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
HOST_MEMORY_SHARE = 0.8  # of the limit, for pinned staging; the rest is Python, dataloaders, NCCL


def host_memory_limit(cgroup_files: tuple[str, ...] = CGROUP_LIMITS,
                      meminfo: str = "/proc/meminfo") -> tuple[int | None, str]:
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


def check_host_memory(config: Any, params: int, world_size: int, local_ranks: int,
                      limit: tuple[int | None, str] | None = None) -> Finding | None:
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
        return Finding("error", "host memory", f"{summary}, more than {HOST_MEMORY_SHARE:.0%} of {source}, "
                                               f"{limit_bytes / 1e9:.1f} GB. Fix: {raise_limit}use more nodes "
                                               "(each rank's share shrinks), or set [checkpoint] async_mode = "
                                               "\"async\" (no pinned memory, longer checkpoint stalls)")
    return Finding("ok", "host memory", f"{summary}, {source}: {limit_bytes / 1e9:.0f} GB")


def check_tokenizer(config: Any, env: Mapping[str, str] | None = None) -> Finding:
    """Present locally or in the Hub cache, or downloadable; never downloads."""
    env = os.environ if env is None else env
    hub_section = getattr(config, "hub", None) or Hub()
    assets_path = config.model.hf_assets_path
    try:
        if assets_path:
            folder = Path(assets_path).expanduser()
            if folder.is_dir() and tokenizer.find_tokenizer_files(folder, hub_section.tokenizer_format):
                return Finding("ok", "tokenizer", f"in {folder}")
        if not hub_section.repo_id:
            tokenizer.resolve_tokenizer(assets_path, hub_section, Path("."))  # raises the usual message
        cache = hub.resolve_cache_dir(hub_section, config.job.dump_folder)
        if cache.is_dir() and tokenizer.cached_tokenizer(hub_section, cache) is not None:
            return Finding("ok", "tokenizer", f"{hub_section.repo_id} in the Hub cache {cache}")
    except UserError as error:
        return Finding("error", "tokenizer", error.line())
    offline = hub.offline(env)
    if offline or not hub_section.allow_download:
        setting = "HF_HUB_OFFLINE" if offline else "hub.allow_download = false"
        return Finding("error", "tokenizer", f"{setting}: the tokenizer of {hub_section.repo_id} is not in the cache {cache}. "
                                             "Fix: stage it (python -m torchtitan_runai.stage --config FILE) or point "
                                             "hub.cache_dir / HF_HUB_CACHE at the staged cache")
    if not env.get(hub.TOKEN_ENV):
        return Finding("warning", "tokenizer", f"will download {hub_section.repo_id} without HF_TOKEN: gated repos "
                                               "(meta-llama) answer 401. Fix: pass HF_TOKEN from a Secret")
    return Finding("ok", "tokenizer", f"will download {hub_section.repo_id} into {cache} (HF_TOKEN set)")


# ---------------------------------------------------------------------------------------------
# All of it


def checkpoint_folder_of(config: Any, env: Mapping[str, str]) -> str:
    return storage.resolve_storage(env, config.job.dump_folder, config.checkpoint.folder,
                                   config.metrics.save_tb_folder).checkpoint_folder


def run_preflight(config: Any, world_size: int, gpu_memory_gib: float | None, dry_run: bool = False,
                  env: Mapping[str, str] | None = None, shm_path: str = "/dev/shm",
                  local_ranks: int | None = None,
                  host_limit: tuple[int | None, str] | None = None, tokenizer_check: bool = True) -> list[Finding]:
    """Every check for a parsed config. Machine-dependent errors become warnings in a dry run.
    ``tokenizer_check=False``: the caller ran ``check_tokenizer`` already (the launcher does, first)."""
    env = os.environ if env is None else env
    findings: list[Finding] = []
    try:
        check_world_size(config, world_size)
        findings.append(Finding("ok", "parallelism", f"degrees tile {world_size} GPU(s)"))
    except UserError as error:
        findings.append(Finding("error", "parallelism", error.line()))
        return findings  # the estimate needs valid degrees
    args = spec.model_args(config)
    settings = TrainSettings.from_config(config, world_size)
    estimate = estimate_memory(args, settings)
    memory = gpu_memory_gib if gpu_memory_gib else DEFAULT_GPU_MEMORY_GIB
    fit = check_fit(estimate, memory, settings)
    if not gpu_memory_gib and fit.level != "ok":
        fit = dataclasses.replace(fit, message=fit.message + " (no GPU visible: assumed an H100 80GB; "
                                                             "pass --gpu-memory-gib)")
    machine: list[Finding] = [fit]  # the fit depends on the GPU: a dry run may be elsewhere
    if config.checkpoint.enable:
        machine.append(check_checkpoint_folder(checkpoint_folder_of(config, env),
                                               BYTES_PER_PARAM_FULL_CHECKPOINT * estimate.params))
    host = check_host_memory(config, estimate.params, world_size, local_ranks or world_size, host_limit)
    if host is not None:
        machine.append(host)
    if tokenizer_check:
        machine.append(check_tokenizer(config, env))
    if dry_run:
        machine = [dataclasses.replace(f, level="warning") if f.level == "error" else f for f in machine]
    findings.extend(machine)
    findings.append(check_dev_shm(shm_path))
    findings.append(Finding("info", "estimate", format_estimate(estimate, settings)))
    return findings


def enforce(findings: list[Finding], warn: Callable[[str], None] | None = None) -> None:
    """For the launcher: print every warning through ``warn``; raise the first error as the one
    line a user error gets (printed once, at the CLI edge)."""
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    for f in findings:
        if f.level == "warning":
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
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        mib = [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):  # no driver tools: skip the fit check
        return None
    return min(mib) * 2**20 / GIB if mib else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_runai.preflight", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the TOML recipe")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default: visible GPUs, else 8")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="default: the visible GPU's, else 79.6 (H100 80GB)")
    parser.add_argument("--dry-run", action="store_true", help="machine-dependent problems are warnings")
    args, overrides = parser.parse_known_args(argv)
    for name in ("nodes", "gpus_per_node"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}", value, "must be at least 1", "pass a positive count")
    gpu_memory = args.gpu_memory_gib or detect_gpu_memory_gib()
    gpus = args.gpus_per_node
    if gpus is None:
        gpus = _visible_gpus() or 8
    world_size = args.nodes * gpus
    from torchtitan_runai.checkpoint.resume import adapt_to_checkpoint

    train_args = ["--job.config_file", args.config, *overrides]
    config = parse_job_config(train_args)
    paths = storage.resolve_storage(dict(os.environ), config.job.dump_folder, config.checkpoint.folder,
                                    config.metrics.save_tb_folder)
    if paths.dump_folder != config.job.dump_folder:  # OUTPUT_DIR, as the launcher applies it
        config = parse_job_config([*train_args, *paths.train_overrides()])
    # an existing checkpoint folder at another node count: the batch its resume will run with
    plan = adapt_to_checkpoint(config, world_size)
    findings = run_preflight(config, world_size, gpu_memory, dry_run=args.dry_run, local_ranks=gpus)
    print(f"preflight: {args.config}, {args.nodes} node(s) x {gpus} GPU(s)")
    if plan is not None and plan.changed:
        print(f"preflight: {plan.line()}")
    print(report(findings))
    return 2 if any(f.level == "error" for f in findings) else 0


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


if __name__ == "__main__":
    cli(main, prog="preflight")
