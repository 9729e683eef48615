"""inputs.data_files: the launcher's dataset checks, one clear error naming the setting.

The same errors from the ranks' loader are tests/unit/training/test_data.py (``test_clear_errors``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from torchtitan_runai.config import Data
from torchtitan_runai.errors import UserError
from torchtitan_runai.inputs import data_files
from torchtitan_runai.inputs.data_files import validate_data_config

TEXTS = [f"sample number {i}: the llama reads text {i * 7} times." for i in range(40)]


@pytest.fixture
def cfg(tmp_path):
    return Data(cache_dir=str(tmp_path / "ds_cache"))


def write_jsonl(path: Path, texts, column="text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_parquet_missing_column_found_cheaply(tmp_path, cfg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": TEXTS}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match="data.text_column"):
        data_files.check_dataset("local", str(tmp_path / "a.parquet"), cfg)


def test_config_level_errors(tmp_path, cfg):
    with pytest.raises(UserError, match="training.dataset = 'nope'"):
        data_files.check_dataset("nope", None, cfg)
    with pytest.raises(UserError, match="training.dataset_path"):
        data_files.check_dataset("local", None, cfg)
    with pytest.raises(UserError, match="training.dataset_path = 'tests/assets/c4_test'"):
        data_files.check_dataset("c4_test", None, cfg)
    with pytest.raises(UserError, match="data.format"):
        data_files.check_dataset("local", str(write_jsonl(tmp_path / "a.jsonl", TEXTS)), Data(format="csv"))
    data_files.check_dataset("c4", None, cfg)  # streams from the Hub: nothing local to check


def test_validate_data_config_checks_training_and_validation(tmp_path, cfg):
    good = str(write_jsonl(tmp_path / "a.jsonl", TEXTS))
    job = SimpleNamespace(
        training=SimpleNamespace(dataset="local", dataset_path=good),
        validation=SimpleNamespace(enable=True, dataset="local", dataset_path=str(tmp_path / "v")),
        data=cfg,
    )
    with pytest.raises(UserError, match="validation.dataset_path"):
        validate_data_config(job)
    job.validation.enable = False
    validate_data_config(job)


def test_on_disk_when_every_dataset_the_ranks_read_is_files():
    def job(train=("local", "./data"), validation=None):
        return SimpleNamespace(
            training=SimpleNamespace(dataset=train[0], dataset_path=train[1]),
            validation=SimpleNamespace(
                enable=validation is not None, dataset=(validation or ("",))[0], dataset_path=None
            ),
        )

    assert data_files.on_disk(job())
    assert data_files.on_disk(job(("c4_test", None)))  # torchtitan's test folder
    assert data_files.on_disk(job(("c4", "/pvc/c4")))  # a named dataset pointed at a folder
    assert not data_files.on_disk(job(("c4", None)))  # streamed from the Hub
    assert not data_files.on_disk(job(validation=("c4_validation",)))
    assert data_files.on_disk(job(validation=("local",)))
