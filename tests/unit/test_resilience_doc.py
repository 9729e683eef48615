"""docs/resilience.md's table of bad inputs stays true: every test it names exists (the file, the
function, and the parametrized case's id), and every case of tests/unit/test_bad_input.py is a row."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "resilience.md"
HEADING = "### Every bad input the suite covers"


def table_rows() -> list[list[str]]:
    text = DOC.read_text()
    assert HEADING in text
    section = text.split(HEADING, 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| input | what the user sees") and rows[1].startswith("| ---")
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[2:]]


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_test_the_table_names_exists():
    rows = table_rows()
    assert len(rows) > 50
    for cells in rows:
        assert len(cells) == 4, cells
        _, seen, code, test = cells
        assert seen and code.isdigit(), cells
        match = re.fullmatch(r"(tests/[\w/]+\.py)::(\w+)(?:\[([\w-]+)\])?", test)
        assert match, f"not a file::test name: {test}"
        path = REPO / match.group(1)
        assert path.is_file(), test
        assert match.group(2) in defined_tests(path), f"no such test: {test}"
        if match.group(3):
            assert f'"{match.group(3)}"' in path.read_text(), f"no such case: {test}"


def test_every_case_of_the_launchers_bad_input_test_is_a_row():
    source = (REPO / "tests/unit/test_bad_input.py").read_text()
    tree = ast.parse(source)
    cases = next(n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "CASES")
    ids = {element.elts[0].value for element in cases.elts}
    named = {re.search(r"\[([\w-]+)\]$", cells[3]).group(1) for cells in table_rows() if cells[3].endswith("]")}
    assert ids - named == set(), "add these cases to docs/resilience.md's table"


def test_a_wrong_name_is_caught(tmp_path, monkeypatch):
    import pytest

    doc = tmp_path / "resilience.md"
    doc.write_text(
        f"{HEADING}\n\n| input | what the user sees | exit | test |\n| --- | --- | --- | --- |\n"
        + "| x | y | 2 | tests/unit/test_errors.py::test_no_such_test |\n" * 60
    )
    monkeypatch.setattr(__import__(__name__), "DOC", doc)
    with pytest.raises(AssertionError, match="no such test"):
        test_every_test_the_table_names_exists()
