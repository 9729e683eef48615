"""The one seam to torchtitan: version pinned exactly, no other module imports torchtitan, imports on
first use, and the tables validation reads from torchtitan's source."""

import dataclasses
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from torchtitan_runai import upstream
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
    offenders = [
        str(p.relative_to(REPO))
        for p in REPO.rglob("*.py")
        if not any(part.startswith(".") for part in p.relative_to(REPO).parts)  # .venv, copies
        and p != REPO / "torchtitan_runai" / "upstream.py"
        and IMPORT.search(p.read_text())
    ]
    assert offenders == []
    assert IMPORT.search("    from torchtitan.models import llama3")  # the pattern sees lazy imports too


def test_no_vendored_torchtitan_tree_shadows_the_real_one():
    assert not (REPO / "torchtitan").exists()


def fields_of(args) -> dict:
    values = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else vars(args)
    return {k: fields_of(v) if isinstance(v, SimpleNamespace) else v for k, v in values.items() if k != "_enforced"}


def test_the_tables_read_from_source_are_the_imported_ones():
    """What validation reads without importing (flavors, named datasets) is torchtitan's own tables."""
    from torchtitan_runai.inputs.data_files import LOCAL  # ours: registered into torchtitan's table by the ranks

    flavors = upstream.llama3_flavors()
    assert list(flavors) == list(upstream.llama3.llama3_args) and "8B" in flavors
    for name, real in upstream.llama3.llama3_args.items():
        assert fields_of(flavors[name]) == fields_of(real)
    assert flavors["8B"] is not upstream.llama3_flavors()["8B"]  # a copy per call
    imported = {name: entry.path for name, entry in upstream.text_datasets.DATASETS.items() if name != LOCAL}
    assert upstream.text_dataset_paths() == imported and imported["c4"] == "allenai/c4"


def test_a_table_of_another_shape_is_unreadable(tmp_path):
    """A torchtitan whose tables are not literals (another version, a patch) is not guessed at."""
    root = Path(sys.modules["torchtitan"].__path__[0])
    files = ("models/llama3/__init__.py", "models/llama3/model/args.py", "hf_datasets/text_datasets.py")
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, tmp_path / rel)
    assert fields_of(upstream.read_llama3_flavors(tmp_path)["8B"]) == fields_of(upstream.llama3_flavors()["8B"])
    for rel, old, new, reader in [
        (files[0], "dim=256,", "dim=BASE_DIM,", upstream.read_llama3_flavors),
        (files[1], "dim: int = 4096", "dim: int = default_dim()", upstream.read_llama3_flavors),
        (files[2], 'path="allenai/c4",', "path=C4_PATH,", upstream.read_text_dataset_paths),
    ]:
        text = (tmp_path / rel).read_text()
        assert old in text
        (tmp_path / rel).write_text(text.replace(old, new, 1))
        with pytest.raises(upstream._Unreadable):
            reader(tmp_path)
        (tmp_path / rel).write_text(text)


def test_torchtitan_is_whole_before_its_first_module_outside_config():
    """Config names import torchtitan's config alone (no compiler); any other name first runs
    torchtitan's package __init__ (its quantization converters), as a plain import would."""
    code = textwrap.dedent("""
        import sys
        from torchtitan_runai import upstream
        upstream.ConfigManager, upstream.JobConfig, upstream.logger, upstream.HuggingFaceTokenizer
        assert "torchtitan.config" in sys.modules, sorted(sys.modules)
        assert not {"torch._inductor", "torchtitan.components.quantization"} & set(sys.modules)
        assert not hasattr(sys.modules["torchtitan"], "__version__")
        upstream.llama3
        names = list(sys.modules)
        assert sys.modules["torchtitan"].__version__ == upstream.EXPECTED_TORCHTITAN
        assert names.index("torchtitan.components.quantization") < names.index("torchtitan.models.llama3")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
