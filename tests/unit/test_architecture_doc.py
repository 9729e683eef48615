"""docs/architecture.md names only what exists, and lists every module of the package.

The document's references, and what each must match (checked with ``ast``: nothing is imported):

- ``path/module:name`` (in backquotes, or a word of a diagram): ``torchtitan_runai/path/module.py``
  (or ``path/module/__init__.py``) defines ``name`` at its top level: a ``def``, a ``class`` or an
  assignment, also inside a top-level ``if``/``try``. An import is not a definition: the doc points
  at where a thing is defined. ``path/module:Class.attr``: the class has ``attr`` (a method, a class
  attribute or field, or ``self.attr`` assigned in one of its methods). Text after the name in
  parentheses is ignored: ``job:parse_job_config(resume=True)``.
- a backquoted path (with a ``/``, or ending in ``.py``): a module, file or folder, under the
  package first (``training/checkpoint/manager``, ``hf/``), else under the repository
  (``tests/unit/test_import_layers.py``, ``bench/``); a diagram's words ending in ``.py`` too.
- the Layout section's tree: a line whose first word ends in ``/`` opens a folder inside the nearest
  folder line above it that is indented less; every ``*.py`` word belongs to the folder of its line.
  Each must exist, and every module of the package (empty ``__init__.py`` files aside) is in it.
- the module table (header ``| module | concern |``): every backquoted name of its first column
  exists (package first, then repository), and every module of the package has a row.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "torchtitan_runai"
REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"

WORD = r"[a-z_][a-z0-9_]*"
NAME = r"[A-Za-z_]\w*"
REFERENCE = re.compile(rf"(?P<module>{WORD}(?:/{WORD})*):(?P<name>{NAME}(?:\.{NAME})*)(?:\(.*\))?")
PATH = re.compile(r"[\w.-]+(?:/[\w.-]+)*/?")
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
SPAN = re.compile(r"`([^`\n]+)`")
MODULE_TABLE_HEADER = re.compile(r"^\|\s*module\s*\|\s*concern\s*\|\s*$")


@dataclass(frozen=True)
class Tree:
    """Where the checked code lives: the package folder and the repository around it."""

    package: Path
    repo: Path

    def module_file(self, module: str) -> Path | None:
        for candidate in (self.package / f"{module}.py", self.package / module / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def exists(self, path: str) -> bool:
        """A module, file or folder: under the package first, else under the repository."""
        bare = path.rstrip("/")
        return any(p.exists() for p in (self.package / bare, self.package / f"{bare}.py", self.repo / bare))

    def modules(self) -> set[str]:
        """Every module file of the package, relative to it; empty ``__init__.py`` files aside."""
        return {
            p.relative_to(self.package).as_posix()
            for p in self.package.rglob("*.py")
            if not (p.name == "__init__.py" and not p.read_text().strip())
        }


REAL = Tree(REPO / PACKAGE, REPO)


def _bound_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a block binds by definition (not by import), looking into ``if``/``try``/``with``."""
    found: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        found[leaf.id] = node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in (
                node.body,
                getattr(node, "orelse", []),
                getattr(node, "finalbody", []),
                *(handler.body for handler in getattr(node, "handlers", [])),
            ):
                found.update(_bound_names(block))
    return found


def _class_members(cls: ast.ClassDef) -> dict[str, ast.AST]:
    """A class's methods, class attributes and fields, and ``self.x`` set in any of its methods."""
    members = _bound_names(cls.body)
    for method in cls.body:
        if not isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) or not method.args.args:
            continue
        this = method.args.args[0].arg
        for node in ast.walk(method):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else ([node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
            )
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id == this:
                        members.setdefault(leaf.attr, leaf)
    return members


def check_reference(reference: str, tree: Tree = REAL) -> str | None:
    """What is wrong with a ``module:name`` reference; None when it names something that exists."""
    match = REFERENCE.fullmatch(reference)
    assert match, reference
    module, name = match["module"], match["name"]
    source = tree.module_file(module)
    if source is None:
        return f"`{reference}`: no module {PACKAGE}/{module}.py"
    scope = _bound_names(ast.parse(source.read_text()).body)
    where, joint = f"{PACKAGE}/{source.relative_to(tree.package).as_posix()}", ":"
    for part in name.split("."):
        if part not in scope:
            return f"`{reference}`: {where} defines no {part!r}"
        node = scope[part]
        where, joint = f"{where}{joint}{part}", "."
        scope = _class_members(node) if isinstance(node, ast.ClassDef) else {}
    return None


def _tokens(line: str) -> list[str]:
    return [word.strip("(),;:") for word in line.split()]


def layout_modules(block: str) -> list[str]:
    """The ``*.py`` paths the Layout tree names, relative to the package (its first line)."""
    lines = [line for line in block.splitlines() if line.strip()]
    folders: list[tuple[int, str]] = [(-1, "")]  # (indent, path) of the open folder lines
    named: list[str] = []
    for line in lines[1:]:
        indent = len(line) - len(line.lstrip())
        while folders[-1][0] >= indent:
            folders.pop()
        words = _tokens(line)
        folder = folders[-1][1]
        if words and words[0].endswith("/"):
            folder = f"{folder}{words[0]}"
            folders.append((indent, folder))
        named += [f"{folder}{word}" for word in words if word.endswith(".py")]
    return named


def module_table_names(doc: str) -> list[str]:
    """The backquoted names in the first column of the module table."""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if MODULE_TABLE_HEADER.match(line)), None)
    assert start is not None, "no module table (header '| module | concern |')"
    names: list[str] = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        names += SPAN.findall(line.split("|")[1])
    return names


def layout_block(doc: str) -> str:
    after = doc.split("\n## Layout\n", 1)
    assert len(after) == 2, "no '## Layout' section"
    block = CODE_BLOCK.search(after[1])
    assert block, "the Layout section has no diagram"
    return block[1]


def references(doc: str) -> list[str]:
    """Every ``module:name`` the doc names: in backquotes, or as a word of a diagram."""
    prose = CODE_BLOCK.sub("", doc)
    found = [span for span in SPAN.findall(prose) if REFERENCE.fullmatch(span)]
    for block in CODE_BLOCK.findall(doc):
        found += [word for word in _tokens(block) if REFERENCE.fullmatch(word)]
    return found


def paths(doc: str) -> list[str]:
    """Backquoted paths in the prose and ``*.py`` words of the diagrams (the Layout tree aside)."""
    prose = CODE_BLOCK.sub("", doc)
    found = [
        span
        for span in SPAN.findall(prose)
        if PATH.fullmatch(span) and ("/" in span or span.endswith(".py")) and not REFERENCE.fullmatch(span)
    ]
    layout = layout_block(doc)
    for block in CODE_BLOCK.findall(doc):
        if block != layout:
            found += [word for word in _tokens(block) if word.endswith(".py") and PATH.fullmatch(word)]
    return found


def problems(doc: str, tree: Tree = REAL) -> list[str]:
    """Everything in ``doc`` that does not match the code, one line each."""
    found = [p for p in (check_reference(r, tree) for r in references(doc)) if p]
    checked = paths(doc)
    found += [f"`{path}`: no such module, file or folder" for path in checked if not tree.exists(path)]
    in_layout = layout_modules(layout_block(doc))
    found += [f"Layout: {PACKAGE}/{path} does not exist" for path in in_layout if not (tree.package / path).is_file()]
    in_table = module_table_names(doc)
    found += [
        f"module table: `{name}` does not exist" for name in in_table if name not in checked and not tree.exists(name)
    ]
    for module in sorted(tree.modules()):
        if module not in in_layout:
            found.append(f"Layout: {PACKAGE}/{module} is missing")
        if module not in in_table:
            found.append(f"module table: {PACKAGE}/{module} has no row")
    return found


def test_the_architecture_doc_names_only_what_exists():
    doc = DOC.read_text()
    assert len(references(doc)) > 60 and len(module_table_names(doc)) > 40  # the parser found the doc's names
    assert problems(doc) == []


def test_the_real_doc_with_names_from_before_the_re_lay_fails():
    """Names the doc used before the package was re-laid out: each is one problem against today's code."""
    stale = (
        "\n| old | `launch:plan_launch` (the thin command defines none), `training/resilience:StopFlag`, "
        "`training/checkpoint/manager:RunaiCheckpointManager.no_such_method`, `training/logs.py` |\n"
    )
    assert problems(DOC.read_text() + stale) == [
        f"`launch:plan_launch`: {PACKAGE}/launch.py defines no 'plan_launch'",
        f"`training/resilience:StopFlag`: no module {PACKAGE}/training/resilience.py",
        (
            f"`training/checkpoint/manager:RunaiCheckpointManager.no_such_method`: "
            f"{PACKAGE}/training/checkpoint/manager.py:RunaiCheckpointManager defines no 'no_such_method'"
        ),
        "`training/logs.py`: no such module, file or folder",
    ]


DOC_TEMPLATE = """# Architecture

| what | module:function |
| --- | --- |
| ok | `launcher/launch:plan_launch`, `goodput/ledger:Ledger.switch`, `job:parse_job_config(resume=True)` |
| bad | {bad_span} |

```
  └─ launcher/launch:main  then {bad_word}
```

## Layout

```
torchtitan_runai/
  errors.py  config.py {layout_extra}     the base (words here are not modules)
  launcher/  launch.py
  training/  trainer.py
    checkpoint/  manager.py
```

| module | concern |
| --- | --- |
| `errors.py` | the base |
| `launcher/launch.py` | `launcher/launch:LaunchPlan.world_size` |
| `training/trainer.py` | `training/trainer:RunaiTrainer.stop_flag` (set in `__init__`) |
| `training/checkpoint/manager.py` | the ranks' side |
| `config.py` | the base |
| {table_extra} | the rest |
"""


def _small_package(root: Path) -> Tree:
    """A small package, written out so that these cases do not depend on today's code."""
    package = root / PACKAGE
    files = {
        "errors.py": "EXIT_HUNG = 142\nfrom json import dumps as imported_here\n",
        "config.py": "try:\n    FAST = True\nexcept ImportError:\n    SLOW = True\n",
        "job.py": "def parse_job_config(args, resume=False):\n    pass\n",
        "goodput/__init__.py": "",
        "goodput/ledger.py": "class Ledger:\n    def switch(self, state):\n        pass\n",
        "launcher/__init__.py": "",
        "launcher/launch.py": (
            "def plan_launch(env):\n    pass\n\n\ndef main():\n    pass\n\n\n"
            "class LaunchPlan:\n    @property\n    def world_size(self):\n        return 1\n"
        ),
        "training/__init__.py": "",
        "training/trainer.py": "class RunaiTrainer:\n    def __init__(self):\n        self.stop_flag = None\n",
        "training/checkpoint/__init__.py": "",
        "training/checkpoint/manager.py": "class RunaiCheckpointManager:\n    pass\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    (root / "bench").mkdir()
    return Tree(package, root)


def _doc(
    bad_span: str = "`config:FAST`",
    bad_word: str = "config:SLOW",
    layout_extra: str = "job.py goodput/ledger.py",
    table_extra: str = "`job.py`, `goodput/ledger.py`, `bench/`",
) -> str:
    return DOC_TEMPLATE.format(bad_span=bad_span, bad_word=bad_word, layout_extra=layout_extra, table_extra=table_extra)


def test_a_true_small_doc_passes(tmp_path):
    tree = _small_package(tmp_path)
    doc = _doc()
    assert "config:SLOW" in references(doc) and "job:parse_job_config(resume=True)" in references(doc)
    assert layout_modules(layout_block(doc)) == [
        "errors.py",
        "config.py",
        "job.py",
        "goodput/ledger.py",
        "launcher/launch.py",
        "training/trainer.py",
        "training/checkpoint/manager.py",
    ]
    assert problems(doc, tree) == []


def test_a_bogus_reference_is_caught(tmp_path):
    tree = _small_package(tmp_path)
    cases = {
        "`launcher/launch:no_such_function`": "launch.py defines no 'no_such_function'",
        "`training/logs:PersonFilter`": f"no module {PACKAGE}/training/logs.py",  # a module that moved away
        "`goodput/ledger:Ledger.no_such_method`": "ledger.py:Ledger defines no 'no_such_method'",
        "`errors:imported_here`": "errors.py defines no 'imported_here'",  # imported, not defined
        "`training/trainer:RunaiTrainer.stop_flag.x`": "RunaiTrainer.stop_flag defines no 'x'",
        "`checkpoint/manager`": "`checkpoint/manager`: no such module, file or folder",
        "`trainer.py`": "`trainer.py`: no such module, file or folder",
    }
    for span, expected in cases.items():
        found = problems(_doc(bad_span=span), tree)
        assert len(found) == 1 and expected in found[0], (span, found)
    found = problems(_doc(bad_word="launch:plan_launch"), tree)  # in a diagram
    assert found == [f"`launch:plan_launch`: no module {PACKAGE}/launch.py"]
    found = problems(_doc(bad_word="training/trainer.py launch.py"), tree)
    assert found == ["`launch.py`: no such module, file or folder"]


def test_a_wrong_or_incomplete_layout_or_module_table_is_caught(tmp_path):
    tree = _small_package(tmp_path)
    assert problems(_doc(layout_extra="job.py goodput/ledger.py logs.py"), tree) == [
        f"Layout: {PACKAGE}/logs.py does not exist"
    ]
    assert problems(_doc(table_extra="`job.py`, `goodput/ledger.py`, `bench/`, `Makefile`"), tree) == [
        "module table: `Makefile` does not exist"
    ]
    assert problems(_doc(layout_extra="job.py"), tree) == [f"Layout: {PACKAGE}/goodput/ledger.py is missing"]
    assert problems(_doc(table_extra="`job.py`, `memory_estimate.py`"), tree) == [
        "`memory_estimate.py`: no such module, file or folder",
        f"module table: {PACKAGE}/goodput/ledger.py has no row",
    ]
