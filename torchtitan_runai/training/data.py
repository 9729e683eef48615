"""Training text: torchtitan's datasets plus local / PVC files, each data-parallel rank its share.

Datasets, by ``training.dataset``:

- ``"c4"``, ``"c4_validation"`` (stream ``allenai/c4`` from the Hub) and ``"c4_test"``: torchtitan's
  own entries, unchanged, except that opening the stream is retried with backoff and a stream
  interrupted by a 429 / 5xx / dropped connection resumes from where it was (its checkpointable
  state) after a bounded backoff, instead of killing the rank and, through it, the whole job; and
  ``c4``'s columns are given (``C4_COLUMNS``), so that opening it reads no shard on any rank.
- ``"local"``: ``training.dataset_path`` names a file or a folder of shards (searched recursively):
  ``.jsonl``/``.json`` (optionally ``.gz``), ``.parquet``, ``.arrow``, ``.txt`` (plain text, one
  sample per paragraph by default), or a folder written by ``datasets``' ``save_to_disk``. All
  shards of a folder must share one format. The text is read from ``data.text_column``.

The training order is global (``data.order = "global"``, ``training.data_position`` and
``training.data_shards``): the same sequences every step at any data-parallel size, so a run resumes
on another node count, and each rank reads only the pieces of the corpus it trains on
(``corpus_pieces``: JSON-lines files read directly, a stream's shards, blocks of rows). With
``data.order = "per-rank"``, or to continue a checkpoint written before the global order, every
dataset goes through torchtitan's ``HuggingFaceTextDataset`` (``split_dataset_by_node`` gives each
data-parallel rank its own share; the sample index / token buffer state is checkpointed and resumed
exactly as torchtitan does, at the same size only) and ``ParallelAwareDataloader``. Local files load map-style by
default (exact resume by sample index; ``datasets`` converts them to Arrow once per node in its
cache, ``data.cache_dir``); ``data.streaming = true`` streams them instead (big corpora; resume via
the stream state).

Mistakes are ``UserError``s before any worker starts (``validate_data_config``) and again at load:
a missing path, an empty file or folder, an unknown format, mixed formats, a missing text column.

Retry budget: keep ``data.retries`` x ``data.max_backoff_s`` below ``comm.train_timeout_seconds``:
while one rank waits for the Hub, the others wait for it in their next collective.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from functools import partial
from typing import Any

import datasets.config as ds_config
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from torchtitan_runai.config import Data, global_batch_of
from torchtitan_runai.errors import UserError
from torchtitan_runai.hub import with_backoff
from torchtitan_runai.inputs.data_files import (
    FORMATS,
    LOCAL,
    ORDERS,
    check_column,
    check_dataset,
    data_config,
    find_data_files,
    sniff_columns,
)
from torchtitan_runai.lifetime import LAUNCHER_ENV
from torchtitan_runai.training import data_position as dp
from torchtitan_runai.training import data_shards as ds_shards
from torchtitan_runai.training.data_peers import build_peers
from torchtitan_runai.training.stream import RetryingStream
from torchtitan_runai.upstream import DatasetConfig, HuggingFaceTextDataset, ParallelAwareDataloader, text_datasets

# ---------------------------------------------------------------------------------------------
# local files


def load_local_dataset(path: str, data: Data):
    """A local dataset as a datasets Dataset (or IterableDataset with data.streaming)."""
    fmt, files = find_data_files(path, data)
    if fmt == "disk":
        ds = load_from_disk(str(files[0]))
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise UserError(
                    "training.dataset_path",
                    path,
                    f"has splits {list(ds)}, no 'train'",
                    "point at the split folder you want",
                )
            ds = ds["train"]
        if data.streaming:
            ds = ds.to_iterable_dataset(num_shards=max(1, len(ds.cache_files)))
        check_column(list(ds.column_names or []) or None, data, path)
    else:
        check_column(sniff_columns(fmt, files[0]), data, path)
        kwargs: dict[str, Any] = {}
        if fmt == "text":
            kwargs["sample_by"] = data.text_sample_by
        ds = load_dataset(
            FORMATS[fmt],
            data_files=[str(f) for f in files],
            split="train",
            streaming=data.streaming,
            cache_dir=data.cache_dir or None,
            **kwargs,
        )
        if ds.column_names is not None:
            check_column(list(ds.column_names), data, path)
    if not data.streaming and len(ds) == 0:
        raise UserError("training.dataset_path", path, "has no records", "write the dataset first")
    return ds


def _text_of(sample: dict[str, Any], column: str) -> str:
    try:
        return sample[column] or ""
    except KeyError:
        raise UserError(
            "data.text_column",
            column,
            f"a sample has no such column ({list(sample)})",
            "set data.text_column to the column holding the text",
        ) from None


# ---------------------------------------------------------------------------------------------
# registry (torchtitan's DATASETS) and the dataset class


def register_datasets(data: Data) -> None:
    """Add "local" to torchtitan's dataset registry and make its Hub loaders retry.

    Done when the training dataloader is built (before torchtitan builds its validator), so that
    torchtitan's own validation dataloader also knows "local"; the entry carries this job's [data]
    settings.
    """
    registry = text_datasets.DATASETS
    registry[LOCAL] = DatasetConfig(
        path="",
        loader=partial(load_local_dataset, data=data),
        sample_processor=partial(_text_of, column=data.text_column),
    )
    for name in ("c4", "c4_validation"):
        entry = registry.get(name)
        if entry is not None:
            loader = getattr(entry.loader, "__wrapped_loader__", entry.loader)
            retrying = _retrying_loader(_with_c4_columns(loader), data, original=loader)
            registry[name] = DatasetConfig(entry.path, retrying, entry.sample_processor)
    # datasets retries reads of a stream itself; bound that too (default: 20 tries x up to 60 s)
    ds_config.STREAMING_READ_MAX_RETRIES = max(1, data.retries)
    ds_config.STREAMING_READ_RETRY_INTERVAL = data.backoff_s
    ds_config.STREAMING_READ_SERVER_UNAVAILABLE_RETRY_INTERVAL = data.max_backoff_s
    ds_config.STREAMING_READ_RATE_LIMIT_RETRY_INTERVAL = data.max_backoff_s
    ds_config.STREAMING_OPEN_MAX_RETRIES = max(1, data.retries)
    ds_config.STREAMING_OPEN_RETRY_INTERVAL = data.backoff_s


C4_COLUMNS = ("text", "timestamp", "url")
"""The columns of ``allenai/c4``'s ``en`` files, all strings."""


def _with_c4_columns(loader):
    """torchtitan's c4 loader (``load_dataset(path, name="en", split=split, streaming=True)``) with c4's
    columns given: ``load_dataset`` otherwise infers them by reading the head of the first shard, on
    every rank (the fake Hub measured it: at DP 4, shard 0 pulled 5 times, 1.34x the shard bytes of
    DP 1; at DP 512, 512 reads of one Hub file before the first step)."""
    split = (getattr(loader, "keywords", None) or {}).get("split")
    if split is None:
        return loader

    def load(path: str):
        from datasets import Features, Value

        features = Features({column: Value("string") for column in C4_COLUMNS})
        return load_dataset(path, name="en", split=split, streaming=True, features=features)

    return load


def _retrying_loader(loader, data: Data, original=None):
    def load(path: str):
        return with_backoff(
            lambda: loader(path),
            retries=data.retries,
            backoff_s=data.backoff_s,
            max_backoff_s=data.max_backoff_s,
            what=f"opening dataset {path}",
        )

    load.__wrapped_loader__ = original or loader  # type: ignore[attr-defined]
    return load


class ResilientTextDataset(HuggingFaceTextDataset):
    """torchtitan's HuggingFaceTextDataset whose stream survives transient Hub errors.

    Only the source iterator is replaced: a stream is read through ``training.stream.RetryingStream``
    (on a 429 / 5xx / dropped connection it is put back to the state it had before the failed read and
    reopened after a backoff, so no sample is lost or repeated). Map-style data is untouched.
    Checkpoint state (sample index, token buffer, stream state) is torchtitan's.
    """

    def __init__(self, *args, data: Data | None = None, sleep=time.sleep, **kwargs):
        super().__init__(*args, **kwargs)
        self._retry = data or Data()
        self._sleep = sleep

    def _get_data_iter(self):
        if isinstance(self._data, Dataset):
            return super()._get_data_iter()
        return iter(
            RetryingStream(
                self._data,
                self.dataset_name,
                self._retry.retries,
                self._retry.backoff_s,
                self._retry.max_backoff_s,
                self._sleep,
            )
        )


# ---------------------------------------------------------------------------------------------
# builders and checks


def build_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config: Any, infinite: bool = True):
    """TrainSpec.build_dataloader_fn: the global-order loader (``data_position``), or torchtitan's
    per-rank text dataloader; either over our dataset registry. Nothing is read until first use, and
    only by the first of a data-parallel rank's pipeline / context / tensor-parallel peers
    (``training.data_peers``; every rank calls this at the same point: its gloo groups are made here)."""
    data = data_config(job_config)
    if data.order not in ORDERS:
        raise UserError("data.order", data.order, "unknown order", f"use one of {list(ORDERS)}")
    register_datasets(data)
    training = job_config.training
    # Under the launcher, every file's content was sampled once per node before the workers started:
    # a rank does not read the head of every shard again (512 ranks x 1,024 shards = 16 GB at start).
    check_dataset(training.dataset, training.dataset_path, data, "training", content=LAUNCHER_ENV not in os.environ)
    comm = job_config.comm
    loader = dp.RunaiDataloader(
        partial(_build_lanes, dp_world_size, dp_rank, tokenizer, job_config, data, infinite),
        partial(_build_per_rank, dp_world_size, dp_rank, tokenizer, job_config, data, infinite),
        partial(_build_shards, dp_world_size, dp_rank, tokenizer, job_config, data, infinite),
        # pipeline / context / tensor-parallel peers: the first reads, the others receive its batches
        peers=build_peers(
            dp_world_size,
            dp_rank,
            job_config.parallelism,
            max(comm.init_timeout_seconds, comm.train_timeout_seconds),
        ),
    )
    if data.order == "per-rank":
        loader.use_per_rank()
    return loader


def _build_lanes(dp_world_size: int, dp_rank: int, tokenizer, job_config: Any, data: Data, infinite: bool):
    training = job_config.training
    name = training.dataset.lower()
    entry = text_datasets.DATASETS[name]
    source = entry.loader(training.dataset_path or entry.path)
    if isinstance(source, Dataset):
        documents = dp.MapDocuments(source, entry.sample_processor, infinite)
    else:
        documents = dp.StreamDocuments(
            source,
            entry.sample_processor,
            retries=data.retries,
            backoff_s=data.backoff_s,
            max_backoff_s=data.max_backoff_s,
            name=name,
            infinite=infinite,
        )
    global_batch = global_batch_of(training, dp_world_size)
    order = dp.GlobalOrder(
        documents,
        lambda text: tokenizer.encode(text, add_bos=True, add_eos=True),
        training.seq_len,
        global_batch,
        dp.lanes_of(global_batch, dp_world_size, dp_rank),
        dataset_name=name,
        rank=dp_rank,
    )
    return dp.LaneLoader(order, training.local_batch_size)


def corpus_pieces(job_config: Any, data: Data, global_batch: int):
    """The pieces of ``training.data_shards`` for this job's dataset: JSON-lines files read directly
    (``local`` with ``data.streaming``), a stream's shards (``c4`` from the Hub, other streamed files),
    or blocks of rows (map-style data). Opens no data file."""
    training = job_config.training
    name = training.dataset.lower()
    entry = text_datasets.DATASETS[name]
    if name == LOCAL and data.streaming:
        fmt, files = find_data_files(training.dataset_path, data)
        if fmt in ("jsonl", "json") and sniff_columns(fmt, files[0]) is not None:  # lines, not a JSON array
            return ds_shards.LineFiles([str(f) for f in files], entry.sample_processor, global_batch)
    source = entry.loader(training.dataset_path or entry.path)
    if isinstance(source, Dataset):
        return ds_shards.MapRows(source, entry.sample_processor, global_batch)
    return ds_shards.StreamShards(
        source,
        entry.sample_processor,
        name=name,
        retries=data.retries,
        backoff_s=data.backoff_s,
        max_backoff_s=data.max_backoff_s,
    )


def _build_shards(dp_world_size: int, dp_rank: int, tokenizer, job_config: Any, data: Data, infinite: bool):
    training = job_config.training
    global_batch = global_batch_of(training, dp_world_size)
    order = ds_shards.ShardOrder(
        corpus_pieces(job_config, data, global_batch),
        lambda text: tokenizer.encode(text, add_bos=True, add_eos=True),
        training.seq_len,
        global_batch,
        dp.lanes_of(global_batch, dp_world_size, dp_rank),
        dataset_name=training.dataset.lower(),
        rank=dp_rank,
        infinite=infinite,
    )
    return dp.LaneLoader(order, training.local_batch_size)


def _build_per_rank(dp_world_size: int, dp_rank: int, tokenizer, job_config: Any, data: Data, infinite: bool):
    training = job_config.training
    dataset = ResilientTextDataset(
        dataset_name=training.dataset,
        dataset_path=training.dataset_path,
        tokenizer=tokenizer,
        seq_len=training.seq_len,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        infinite=infinite,
        data=data,
    )
    return ParallelAwareDataloader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **{**asdict(training.dataloader), "batch_size": training.local_batch_size},
    )
