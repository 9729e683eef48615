"""The one seam to torchtitan: version pinned exactly, and no other module imports torchtitan."""

import re
from pathlib import Path

import pytest

from torchtitan_runai.errors import UserError
from torchtitan_runai.upstream import EXPECTED_TORCHTITAN, check_torchtitan_version, installed_torchtitan_version

REPO = Path(__file__).resolve().parents[2]
IMPORT = re.compile(r"^\s*(from|import)\s+torchtitan(\.|\s|$)", re.M)


def test_installed_version_is_the_pinned_one():
    assert installed_torchtitan_version() == EXPECTED_TORCHTITAN == "0.2.2"
    assert f'"torchtitan=={EXPECTED_TORCHTITAN}"' in (REPO / "pyproject.toml").read_text()


@pytest.mark.parametrize("found", ["0.3.0", "0.2.1", None])
def test_other_versions_fail_with_one_clear_line(found):
    with pytest.raises(UserError) as e:
        check_torchtitan_version(found or "")
    assert e.value.setting == "torchtitan" and "0.2.2" in e.value.line() and "pip install" in e.value.fix


def test_only_upstream_imports_torchtitan():
    """Every .py of the repo (the package's subpackages, bench/, tests/) but torchtitan_runai/upstream.py."""
    offenders = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py")
                 if not any(part.startswith(".") for part in p.relative_to(REPO).parts)  # .venv, copies
                 and p != REPO / "torchtitan_runai" / "upstream.py" and IMPORT.search(p.read_text())]
    assert offenders == []
    assert IMPORT.search("    from torchtitan.models import llama3")  # the pattern sees lazy imports too


def test_no_vendored_torchtitan_tree_shadows_the_real_one():
    assert not (REPO / "torchtitan").exists()
