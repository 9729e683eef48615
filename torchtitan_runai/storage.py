"""Where a run writes: one variable, ``OUTPUT_DIR``, moves everything that must survive a pod.

In a pod only a PersistentVolumeClaim outlives a restart or a preemption. So the four things a
run writes or caches are rooted in one folder, and that folder is the PVC's mount path:

=================  ==========================================  ==================================
what               where (``OUTPUT_DIR`` set)                  where (unset: workstation)
=================  ==========================================  ==================================
dump folder        ``$OUTPUT_DIR``                             ``job.dump_folder`` of the config
checkpoints        ``$OUTPUT_DIR/<checkpoint.folder>``         ``<dump>/<checkpoint.folder>``
TensorBoard logs   ``$OUTPUT_DIR/<metrics.save_tb_folder>``    ``<dump>/<metrics.save_tb_folder>``
Hugging Face cache ``$OUTPUT_DIR/.cache/huggingface``          huggingface_hub's default
=================  ==========================================  ==================================

``OUTPUT_DIR`` is read here only (``resolve_storage``), and applied to a parsed config here only
(``apply_output_dir``: the launcher and ``python -m torchtitan_runai.preflight``). Every other module
asks this one for a path under the dump folder, from a parsed config (after the launcher applied
``OUTPUT_DIR``, ``job.dump_folder`` is the PVC): ``checkpoint_dir`` (the checkpoint folder, joined by
``checkpoint_folder_path`` alone), ``tensorboard_dir``, ``export_dir`` (``[export] folder``),
``plot_file`` (the loss/throughput PNG), ``default_hub_cache`` (the Hub cache when nothing else names
one) and ``inductor_cache_dir`` (compiled kernels, so a restarted pod reuses them).

``OUTPUT_DIR`` must be absolute and must equal the PVC mount path (``--existing-pvc
claimname=X,path=$OUTPUT_DIR`` for Run:ai, the ``volumeMounts`` path in a PyTorchJob/TrainJob;
``python -m torchtitan_runai.manifest`` writes both from one ``--pvc CLAIM:MOUNT``). The image sets
``OUTPUT_DIR=/outputs`` (a world-writable folder, so a ``docker run`` without a volume still works,
losing its outputs with the container). An explicit ``HF_HOME`` in the environment is respected.
With ``OUTPUT_DIR`` set, ``checkpoint.folder`` and ``metrics.save_tb_folder`` must be relative:
torchtitan joins them onto the dump folder, and an absolute one would silently leave the PVC.

Checkpoint size and retention. A full (resumable) checkpoint holds the fp32 weights and AdamW's two
fp32 moments: 12 bytes per parameter (dataloader, scheduler and RNG state are negligible):

======== =================== ================
recipe   parameters          one checkpoint
======== =================== ================
8B       8,030,261,248       ~96 GB  (≈ 100 GB)
70B      70,553,706,496      ~847 GB (≈ 1 TB)
405B     405,853,388,800     ~4.9 TB
======== =================== ================

Old checkpoints are removed only once a new one is complete (``checkpoint.folder.retain``: at most
``keep_latest_k`` complete ones, whatever wrote them), so the PVC must hold ``keep_latest_k + 1`` of
them at the peak (``checkpoint.folder.peak_room``, which preflight checks). :func:`recommend_keep_latest_k` turns a
PVC size into the largest safe
``checkpoint.keep_latest_k`` (10% of the PVC kept free for TensorBoard, the HF cache and the
filesystem; capped at 10, torchtitan's default; never 1, which torchtitan forbids, never 0 = keep all).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torchtitan_runai.errors import UserError

BYTES_PER_PARAM_FULL_CHECKPOINT = 12
"""fp32 weights (4) + AdamW exp_avg (4) + exp_avg_sq (4): a full (resumable) checkpoint, and the
host memory pinned staging holds (dataloader, scheduler and RNG state are negligible)."""

OUTPUT_DIR_ENV = "OUTPUT_DIR"
IMAGE_OUTPUT_DIR = "/outputs"
"""OUTPUT_DIR baked into the image and the default PVC mount path of the generated specs."""

HF_CACHE_SUBDIR = os.path.join(".cache", "huggingface")
INDUCTOR_CACHE_SUBDIR = os.path.join(".cache", "inductor")
HUB_CACHE_FALLBACK = "hf_cache"
PLOT_NAME = "training_curves.png"
GOODPUT_LEDGER = "goodput"
GOODPUT_SUMMARY = "goodput.json"
GOODPUT_PLOT = "goodput.png"

PARAMS_BY_FLAVOR = {
    "8B": 8_030_261_248,
    "70B": 70_553_706_496,
    "405B": 405_853_388_800,
}
"""Llama 3.1 parameter counts by torchtitan ``model.flavor``."""

PVC_FREE_FRACTION = 0.10
"""Share of the PVC kept free for TensorBoard, the HF cache, the model-only final save, fs slack."""

MAX_RECOMMENDED_KEEP = 10
"""Cap of the recommendation: torchtitan's own default; more is rarely useful."""

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]i?)?[Bb]?\s*$")
_UNITS = {
    None: 1,
    **{p: 1000 ** (i + 1) for i, p in enumerate("KMGTPE")},
    **{p + "i": 1024 ** (i + 1) for i, p in enumerate("KMGTPE")},
}


@dataclass(frozen=True)
class StoragePaths:
    """The folders a run uses; the launcher passes them on to torchtitan and the environment."""

    dump_folder: str
    """``job.dump_folder`` for torchtitan (``--job.dump_folder``)."""

    checkpoint_folder: str
    """Where checkpoints land: ``dump_folder/checkpoint.folder`` (``checkpoint_folder_path``)."""

    tensorboard_folder: str
    """Parent of TensorBoard's per-run folders: ``dump_folder/metrics.save_tb_folder``."""

    hf_home: str | None
    """``HF_HOME`` to export, or None to leave huggingface_hub's default (no OUTPUT_DIR)."""

    def train_overrides(self) -> list[str]:
        """torchtitan CLI overrides that put the run's outputs under ``dump_folder``."""
        return [f"--job.dump_folder={self.dump_folder}"]

    def env_updates(self) -> dict[str, str]:
        """Environment for the training processes (the HF cache follows OUTPUT_DIR)."""
        return {} if self.hf_home is None else {"HF_HOME": self.hf_home}


def resolve_storage(
    env: Mapping[str, str],
    dump_folder: str = "./outputs",
    checkpoint_folder: str = "checkpoint",
    tb_folder: str = "tb",
) -> StoragePaths:
    """Apply the OUTPUT_DIR policy to a config's ``job.dump_folder``, ``checkpoint.folder`` and
    ``metrics.save_tb_folder`` (torchtitan's defaults as defaults). Pure: reads only ``env``."""
    output_dir = env.get(OUTPUT_DIR_ENV, "").strip()
    if not output_dir:
        return StoragePaths(
            dump_folder=dump_folder,
            checkpoint_folder=checkpoint_folder_path(dump_folder, checkpoint_folder),
            tensorboard_folder=os.path.join(dump_folder, tb_folder),
            hf_home=env.get("HF_HOME") or None,
        )
    if not os.path.isabs(output_dir):
        raise UserError(
            OUTPUT_DIR_ENV,
            output_dir,
            "must be an absolute path (the PVC mount path); a relative one depends on the cwd",
            f"set {OUTPUT_DIR_ENV} to the PVC mount path, e.g. {IMAGE_OUTPUT_DIR}",
        )
    for setting, value in (("checkpoint.folder", checkpoint_folder), ("metrics.save_tb_folder", tb_folder)):
        if os.path.isabs(value):
            raise UserError(
                setting,
                value,
                f"is absolute, so it would not be under {OUTPUT_DIR_ENV}={output_dir} (the PVC)",
                "use a folder name relative to the dump folder, e.g. 'checkpoint' or 'tb'",
            )
    output_dir = os.path.normpath(output_dir)
    return StoragePaths(
        dump_folder=output_dir,
        checkpoint_folder=checkpoint_folder_path(output_dir, checkpoint_folder),
        tensorboard_folder=os.path.join(output_dir, tb_folder),
        hf_home=env.get("HF_HOME") or os.path.join(output_dir, HF_CACHE_SUBDIR),
    )


def apply_output_dir(
    config: Any, train_args: list[str], env: Mapping[str, str], parse: Callable[[list[str]], Any]
) -> tuple[Any, list[str], StoragePaths]:
    """``OUTPUT_DIR`` applied to a parsed config: (the config, the trainer's arguments, the paths).

    When ``OUTPUT_DIR`` moves the dump folder, ``--job.dump_folder`` is added to the arguments and
    the config is parsed again from them by ``parse`` (the caller's ``job.parse_job_config``, with
    its world size: the checks that depend on the folder, a resume among them, see the new one).
    Otherwise the config and the arguments are returned as they are.
    """
    paths = resolve_storage(env, config.job.dump_folder, config.checkpoint.folder, config.metrics.save_tb_folder)
    if paths.dump_folder == config.job.dump_folder:
        return config, train_args, paths
    train_args = [*train_args, *paths.train_overrides()]
    return parse(train_args), train_args, paths


# ---------------------------------------------------------------------------------------------
# Paths under the dump folder of a parsed config


def checkpoint_folder_path(dump_folder: str, folder: str) -> str:
    """``<dump_folder>/<folder>`` (``job.dump_folder``, ``checkpoint.folder``): the one place the
    checkpoint folder is joined, the way torchtitan's CheckpointManager joins it (an absolute
    ``checkpoint.folder`` stands alone)."""
    return os.path.join(dump_folder, folder)


def checkpoint_dir(config: Any) -> Path:
    """``<job.dump_folder>/<checkpoint.folder>``: where torchtitan writes the ``step-N`` folders."""
    return Path(checkpoint_folder_path(config.job.dump_folder, config.checkpoint.folder))


def tensorboard_dir(config: Any) -> Path:
    """``<job.dump_folder>/<metrics.save_tb_folder>``: parent of TensorBoard's per-run folders."""
    return Path(config.job.dump_folder) / config.metrics.save_tb_folder


def export_dir(config: Any) -> Path:
    """``[export] folder``, relative to the dump folder unless absolute."""
    return Path(config.job.dump_folder) / config.export.folder


def goodput_dir(config: Any) -> Path:
    """The goodput ledger: beside the checkpoints (it must outlive the pod the same way), else in
    the dump folder."""
    base = checkpoint_dir(config) if config.checkpoint.enable else Path(config.job.dump_folder)
    return base / GOODPUT_LEDGER


def goodput_summary_file(config: Any) -> Path:
    """``<job.dump_folder>/goodput.json``: the breakdown, rewritten at every goodput line."""
    return Path(config.job.dump_folder) / GOODPUT_SUMMARY


def plot_file(folder: str | os.PathLike) -> Path:
    """The loss/throughput PNG for a dump or TensorBoard folder."""
    return Path(folder) / PLOT_NAME


def default_hub_cache(dump_folder: str | os.PathLike) -> Path:
    """The Hub cache when neither hub.cache_dir, HF_HUB_CACHE nor HF_HOME names one."""
    return Path(dump_folder).expanduser() / HUB_CACHE_FALLBACK


def inductor_cache_dir(dump_folder: str | os.PathLike) -> Path:
    """``TORCHINDUCTOR_CACHE_DIR`` on the output volume: compiled kernels outlive the pod."""
    return Path(dump_folder) / INDUCTOR_CACHE_SUBDIR


# ---------------------------------------------------------------------------------------------
# Sizes and retention


def parse_size(text: str, setting: str = "--pvc-size") -> int:
    """'10Ti', '500Gi', '1T', '2e12' → bytes (Kubernetes quantity suffixes, decimal or binary)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if value > 0:
            return int(value)
        raise UserError(setting, text, "is not a size", "write it like a PVC request: 500Gi, 10Ti, 2T")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit])


def checkpoint_bytes(flavor: str) -> int:
    """Size of one full checkpoint of a Llama 3.1 flavor ('8B', '70B', '405B')."""
    if flavor not in PARAMS_BY_FLAVOR:
        raise UserError(
            "model.flavor",
            flavor,
            "has no documented checkpoint size",
            f"use one of {sorted(PARAMS_BY_FLAVOR)} or pass the size explicitly",
        )
    return PARAMS_BY_FLAVOR[flavor] * BYTES_PER_PARAM_FULL_CHECKPOINT


def max_keep_latest_k(pvc_bytes: int, one_checkpoint_bytes: int) -> int:
    """Largest k such that k + 1 checkpoints fit in the usable part of the PVC (may be < 2)."""
    usable = int(pvc_bytes * (1 - PVC_FREE_FRACTION))
    return usable // one_checkpoint_bytes - 1


def recommend_keep_latest_k(pvc_bytes: int, one_checkpoint_bytes: int) -> int:
    """``checkpoint.keep_latest_k`` for a PVC: as many as fit (capped at 10), at least 2."""
    fit = max_keep_latest_k(pvc_bytes, one_checkpoint_bytes)
    if fit < 2:
        need = int(3 * one_checkpoint_bytes / (1 - PVC_FREE_FRACTION))
        raise UserError(
            "PVC size",
            f"{pvc_bytes / 1e12:.2f} TB",
            f"holds fewer than 3 checkpoints of {one_checkpoint_bytes / 1e9:.0f} GB (2 kept + 1 being written)",
            f"use a PVC of at least {need / 1e12:.1f} TB",
        )
    return min(fit, MAX_RECOMMENDED_KEEP)


def check_keep_latest_k(keep_latest_k: int, pvc_bytes: int, one_checkpoint_bytes: int) -> None:
    """Raise if the configured retention can fill the PVC (0 = keep all always can)."""
    fit = max_keep_latest_k(pvc_bytes, one_checkpoint_bytes)
    if keep_latest_k == 0 or keep_latest_k > fit:
        recommended = recommend_keep_latest_k(pvc_bytes, one_checkpoint_bytes)
        raise UserError(
            "checkpoint.keep_latest_k",
            keep_latest_k,
            f"{'keeps every checkpoint' if keep_latest_k == 0 else f'{keep_latest_k} + 1 checkpoints'}"
            f" of {one_checkpoint_bytes / 1e9:.0f} GB can fill a {pvc_bytes / 1e12:.2f} TB PVC",
            f"set checkpoint.keep_latest_k = {recommended} (or use a larger PVC)",
        )


GRACE_PERIOD_ENV = "TERMINATION_GRACE_PERIOD_SECONDS"
"""The pod's terminationGracePeriodSeconds, as the spec generator (``manifest``) passes it to the pod."""
DEFAULT_GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds
SHUTDOWN_MARGIN_S = 5  # SHUTDOWN_TIMEOUT's default: the grace period less this (the launcher's own exit)


def grace_period(env: Mapping[str, str]) -> tuple[int, str]:
    """(seconds, where it came from): the pod's grace period from ``GRACE_PERIOD_ENV``, else 30 s."""
    text = env.get(GRACE_PERIOD_ENV, "").strip()
    if not text:
        return DEFAULT_GRACE_S, "Kubernetes' default"
    if not text.isdigit() or int(text) < 1:
        raise UserError(
            GRACE_PERIOD_ENV,
            text,
            "is not a whole number of seconds",
            "set it to the pod's terminationGracePeriodSeconds, e.g. 300 (the manifest generator does)",
        )
    return int(text), GRACE_PERIOD_ENV


def default_shutdown_timeout(env: Mapping[str, str]) -> int:
    """SHUTDOWN_TIMEOUT when unset: the grace period less a margin (25 s for Kubernetes' default)."""
    return max(1, grace_period(env)[0] - SHUTDOWN_MARGIN_S)


def recommended_grace_seconds(one_checkpoint_bytes: int, nodes: int, write_bytes_per_s_per_node: float = 5e8) -> int:
    """Pod ``terminationGracePeriodSeconds``: time for the SIGTERM checkpoint, every node writing
    its share at ``write_bytes_per_s_per_node`` (500 MB/s: a conservative shared-filesystem rate),
    plus 60 s to finish the step and tear down; within [180, 3600]. Only an upper bound: the pod
    ends as soon as the launcher exits."""
    seconds = 60 + one_checkpoint_bytes / max(nodes, 1) / write_bytes_per_s_per_node
    return int(min(max(seconds, 180), 3600))
