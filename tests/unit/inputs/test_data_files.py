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


# -- the content, sampled before any worker starts (issue 24) --------------------------------------


def check_local(path: Path, data: Data) -> None:
    data_files.check_dataset("local", str(path), data)


def test_a_jsonl_whose_first_line_is_not_json_names_the_file_and_line(tmp_path, cfg):
    path = tmp_path / "a.jsonl"
    path.write_text("text,id\n" + "".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    with pytest.raises(UserError) as caught:
        check_local(path, cfg)
    line = caught.value.line()
    assert line.startswith(f"training.dataset_path = '{path}': line 1: is not JSON") and "JSON Lines" in line


def test_a_binary_file_named_jsonl_is_one_line(tmp_path, cfg):
    path = tmp_path / "a.jsonl"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(UserError, match=r"line 1: is not UTF-8 text .*binary"):
        check_local(path, cfg)


def test_a_record_without_the_text_column_names_its_line(tmp_path, cfg):
    path = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    lines = path.read_text().splitlines(keepends=True)
    lines[4] = json.dumps({"content": "no text here"}) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(UserError) as caught:
        check_local(path, cfg)
    assert caught.value.setting == "data.text_column" and caught.value.why.startswith("line 5: has no 'text' column")


def test_a_text_column_that_is_not_a_string(tmp_path, cfg):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(10)))
    with pytest.raises(UserError, match=r"line 1: 'text' holds a JSON int, not text"):
        check_local(path, cfg)


def test_a_bad_line_deep_in_the_file_is_found_at_its_offset(tmp_path, cfg):
    path = write_jsonl(tmp_path / "big.jsonl", TEXTS * 500)  # 20000 lines: far past the head
    lines = path.read_text().splitlines(keepends=True)
    for i in range(12000, 20000):  # its last part is another format (two exports concatenated)
        lines[i] = f"{i},some text,{i * 7}\n"
    path.write_text("".join(lines))
    with pytest.raises(UserError, match=r"the line at byte \d+: is not JSON"):
        check_local(path, cfg)


def test_every_file_of_a_folder_is_sampled(tmp_path, cfg):
    write_jsonl(tmp_path / "d" / "a.jsonl", TEXTS)
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(UserError, match=r"b.jsonl': line 2: is not JSON"):
        check_local(tmp_path / "d", cfg)


def test_good_files_pass_json_arrays_and_gzip_included(tmp_path, cfg):
    import gzip

    check_local(write_jsonl(tmp_path / "a.jsonl", TEXTS * 300), cfg)
    (tmp_path / "arr.json").write_text(json.dumps([{"text": t} for t in TEXTS], indent=1))
    check_local(tmp_path / "arr.json", cfg)
    with gzip.open(tmp_path / "z" / "a.jsonl.gz" if (tmp_path / "z").mkdir() is None else "", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    check_local(tmp_path / "z", cfg)
    (tmp_path / "t.txt").write_text("\n".join(TEXTS))
    check_local(tmp_path / "t.txt", cfg)


def test_parquet_text_column_of_another_type_or_not_parquet_at_all(tmp_path, cfg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": list(range(10))}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match=r"column 'text' is int64, not text"):
        check_local(tmp_path / "a.parquet", cfg)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "b.parquet").write_text("this is not parquet")
    with pytest.raises(UserError, match=r"b.parquet': the file: is not a readable parquet file"):
        check_local(tmp_path / "b", cfg)


def test_content_is_sampled_only_where_asked(tmp_path, cfg, monkeypatch):
    """The launcher samples every file's content once per node; a rank it started (``content=False``,
    ``training.data``) opens no file for it: 512 ranks x 1,024 shards would each read every head."""
    path = write_jsonl(tmp_path / "d" / "a.jsonl", TEXTS, column="body")  # no text column
    with pytest.raises(UserError, match="data.text_column"):
        data_files.check_dataset("local", str(path.parent), cfg)
    opened = []
    monkeypatch.setattr(data_files, "open", lambda *a, **k: opened.append(a) or open(*a, **k), raising=False)
    monkeypatch.setattr(data_files.gzip, "open", lambda *a, **k: opened.append(a), raising=False)
    data_files.check_dataset("local", str(path.parent), cfg, content=False)
    assert opened == []
