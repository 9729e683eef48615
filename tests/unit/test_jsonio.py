"""torchtitan_runai.jsonio: records written atomically, read back as a dict or None."""

from __future__ import annotations

import json

from torchtitan_runai.jsonio import read_json, write_json_atomic


def test_write_is_atomic(tmp_path):
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    write_json_atomic(tmp_path / "x.json", {"a": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_read_gives_none_for_what_is_no_record(tmp_path):
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "partial.json").write_text('{"a": ')
    assert read_json(tmp_path / "partial.json") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "list.json") is None
    write_json_atomic(tmp_path / "ok.json", {"b": [1]})
    assert read_json(tmp_path / "ok.json") == {"b": [1]}
