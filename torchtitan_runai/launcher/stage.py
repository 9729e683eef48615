"""Pre-stage a job's tokenizer and dataset (onto a PVC) before a big job starts.

    python -m torchtitan_runai.stage --config FILE.toml [--output-dir /pvc/stage] [overrides]

Run it once (a one-pod job, or a workstation with the PVC mounted) so that 16 pods do not all
call the Hub at the same moment. ``HF_TOKEN`` comes from the environment, as in the job.

Without ``--output-dir`` it fills the job's own locations: the tokenizer goes into the cache the
job will read (``hub.cache_dir``, ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or
``<job.dump_folder>/hf_cache``: point one of them at the PVC) and a local dataset is checked.
``OUTPUT_DIR`` moves them as it moves the job's (``storage.apply_output_dir``, as the launcher
applies it). A relative ``job.dump_folder`` is taken from the current directory; one that would make
a new folder at the file system's root (run from ``/``) is refused with a line naming it: pass
``--output-dir``, set ``OUTPUT_DIR``, or run from the repository.

Without a network the first failed connection is the command's line at once (``hub.with_backoff``:
no backoff when no connection could be made at all).

With ``--output-dir DIR`` everything is copied under DIR and the command prints the settings that
make the job use it:
- tokenizer: a local ``model.hf_assets_path`` is copied to ``DIR/tokenizer`` (tokenizer files only);
  otherwise ``hub.repo_id``'s tokenizer files are downloaded into the cache ``DIR/hf_cache``;
- dataset: a local dataset is copied to ``DIR/data/<name>``; ``c4`` gets its first
  ``data.stage_c4_shards`` English train shards in ``DIR/data/c4/en`` (then train with
  ``training.dataset = "local"``).
Staging is idempotent: files already there are not fetched again. Exit 0 when staged, 2 with one
line for a problem you can fix (bad token, licence not accepted, missing data, ...).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from torchtitan_runai import errors, hub, storage
from torchtitan_runai.config import Data, Hub
from torchtitan_runai.inputs import tokenizer_files
from torchtitan_runai.inputs.data_files import LOCAL, check_dataset, find_data_files
from torchtitan_runai.job import parse_job_config

PROG = "torchtitan_runai.stage"
C4_REPO = "allenai/c4"
C4_SHARD = "en/c4-train.{index:05d}-of-01024.json.gz"
_TOKENIZER_GLOBS = ("tokenizer*.json", "special_tokens_map.json", "tokenizer.model", "original/tokenizer.model")


def stage_tokenizer(job_config: Any, output_dir: Path | None) -> tuple[Path, list[str]]:
    """Stage the tokenizer; returns its folder and the overrides that make a job use it."""
    hub_section: Hub = getattr(job_config, "hub", None) or Hub()
    assets_path = job_config.model.hf_assets_path
    if output_dir is None:
        return tokenizer_files.ensure_tokenizer(job_config), []
    local = Path(assets_path).expanduser() if assets_path else None
    if (
        local is not None
        and local.is_dir()
        and tokenizer_files.find_tokenizer_files(local, hub_section.tokenizer_format)
    ):
        target = output_dir / "tokenizer"
        for pattern in _TOKENIZER_GLOBS:
            for src in local.glob(pattern):
                dst = target / src.relative_to(local)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        return target, [f"--model.hf_assets_path={target}"]
    cache = output_dir / "hf_cache"
    folder = tokenizer_files.resolve_tokenizer(assets_path, hub_section, cache)
    return folder, [f"--hub.cache_dir={cache}"]


def stage_dataset(job_config: Any, output_dir: Path | None) -> tuple[str, list[str]]:
    """Stage the training dataset; returns a description and the overrides that use the copy."""
    data: Data = getattr(job_config, "data", None) or Data()
    hub_section: Hub = getattr(job_config, "hub", None) or Hub()
    name = job_config.training.dataset.lower()
    path = job_config.training.dataset_path
    if name in ("c4", "c4_validation") and not path:
        if output_dir is None:
            return f"{name} streams from the Hub (pass --output-dir to stage shards of it)", []
        target = output_dir / "data" / "c4"
        _download_c4(target, data.stage_c4_shards, hub_section)
        return (
            f"{data.stage_c4_shards} c4 shards in {target / 'en'}",
            [f"--training.dataset={LOCAL}", f"--training.dataset_path={target / 'en'}"],
        )
    check_dataset(name, path, data)
    if name == LOCAL:
        source = Path(path).expanduser()
    else:
        # torchtitan's dataset table imports Hugging Face datasets (seconds, and what the launcher-import
        # test forbids the launcher's side at module level): only for a named dataset
        from torchtitan_runai.upstream import text_datasets

        source = Path(path or text_datasets.DATASETS[name].path).expanduser()
    if output_dir is None:
        return f"{name} dataset at {source} checked", []
    target = output_dir / "data" / source.name
    if target.resolve() != source.resolve():
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    if name == LOCAL:
        find_data_files(str(target), data)  # the copy is complete and readable
    return f"{name} dataset copied to {target}", [f"--training.dataset_path={target}"]


def _download_c4(target: Path, shards: int, hub_section: Hub) -> None:
    c4 = Hub(
        repo_id=C4_REPO,
        revision="main",
        retries=hub_section.retries,
        backoff_s=hub_section.backoff_s,
        max_backoff_s=hub_section.max_backoff_s,
    )
    for index in range(shards):
        name = C4_SHARD.format(index=index)
        if (target / name).is_file():
            continue
        hub.download_file(c4, name, local_dir=target, repo_type="dataset", optional=False)


def stage(job_config: Any, output_dir: str | None = None) -> list[str]:
    """Stage tokenizer and dataset; returns the lines to print (no secrets in them)."""
    out = Path(output_dir).expanduser().resolve() if output_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    folder, tok_overrides = stage_tokenizer(job_config, out)
    what, data_overrides = stage_dataset(job_config, out)
    lines = [f"tokenizer: {folder}", f"dataset: {what}"]
    overrides = tok_overrides + data_overrides
    if overrides:
        lines.append("run the job with: " + " ".join(overrides))
        lines.append("optionally export HF_HUB_OFFLINE=1 so the job never calls the Hub")
    return lines


def job_locations(job_config: Any, train_args: list[str]) -> Any:
    """Without ``--output-dir``: the job's own locations, ``OUTPUT_DIR`` applied as the launcher applies
    it (``HF_HOME`` included); refused when the tokenizer's download would make a folder at the file
    system's root."""
    job_config, _, paths = storage.apply_output_dir(job_config, train_args, os.environ, parse_job_config)
    for key, value in paths.env_updates().items():
        os.environ.setdefault(key, value)
    hub_section: Hub = getattr(job_config, "hub", None) or Hub()
    local = job_config.model.hf_assets_path
    if local and tokenizer_files.find_tokenizer_files(Path(local).expanduser(), hub_section.tokenizer_format):
        return job_config  # nothing to download: nothing written
    cache = hub.resolve_cache_dir(hub_section, job_config.job.dump_folder).expanduser().absolute()
    top = Path(cache.anchor, *cache.parts[1:2])
    if len(cache.parts) > 1 and not top.exists():
        raise errors.UserError(
            "--output-dir",
            None,
            f"without it the tokenizer would be downloaded into {cache}, a new folder {top} at the file "
            f"system's root (job.dump_folder = {job_config.job.dump_folder!r} is taken from the current "
            f"directory, {os.getcwd()})",
            "pass --output-dir on the volume the job reads (e.g. --output-dir /pvc/stage), set OUTPUT_DIR as the "
            "job does, or run from the repository",
        )
    return job_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the job's TOML config")
    parser.add_argument("--output-dir", help="stage under this folder (e.g. on the PVC)")
    args, overrides = parser.parse_known_args(argv)
    train_args = ["--job.config_file", args.config, *overrides]
    job_config = parse_job_config(train_args)
    if not args.output_dir:
        job_config = job_locations(job_config, train_args)
    for line in stage(job_config, args.output_dir):
        print(hub.redact(line), flush=True)
    return 0


def entry() -> None:
    errors.cli(main, PROG)
