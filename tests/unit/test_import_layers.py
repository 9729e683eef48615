"""The package's layers point one way, and the launcher's side never imports the ranks' side.

Every module is parsed with ``ast`` (not imported), every ``import`` / ``from ... import`` in it,
including function-level lazy ones, becomes an edge to the package modules it names, and:

- the graph has no cycle (the levels, the longest import chain below each module, print with ``-s``);
- the two sides: ``launcher/`` (one process per pod, must start fast) imports nothing of
  ``training/`` (what torchrun starts on every rank), and ``training/`` nothing of ``launcher/``;
- the base (every other module but the thin commands) imports neither side;
- ``errors`` imports nothing of the package, ``config`` only ``errors``, ``upstream`` and the seed rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "torchtitan_runai"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """Package modules that ``source`` (module ``name``) imports anywhere in its body."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # "from pkg import mod" names a module; "from mod import thing" names mod
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != PACKAGE:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(files)
    return {name: imported_modules(p.read_text(), name, p.name == "__init__.py", modules) for name, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    out: dict[str, int] = {}

    def level(node: str) -> int:
        if node not in out:
            out[node] = 1 + max((level(n) for n in graph[node]), default=-1)
        return out[node]

    for node in graph:
        level(node)
    return out


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and f"{PACKAGE}.training.checkpoint.manager" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    by_level = levels(graph)
    for n in range(max(by_level.values()) + 1):
        print(n, sorted(m.removeprefix(PACKAGE + ".") for m, lv in by_level.items() if lv == n))


COMMANDS = {f"{PACKAGE}.{m}" for m in ("launch", "preflight", "manifest", "stage")}
"""``python -m torchtitan_runai.X`` entry points of the launcher's side: a few lines each."""


def side(module: str) -> str:
    if module in COMMANDS:
        return "command"
    for name in ("launcher", "training"):
        if module == f"{PACKAGE}.{name}" or module.startswith(f"{PACKAGE}.{name}."):
            return name
    return "base"


def crossings(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes from one side to the other, or from the base up to a side."""
    allowed = {
        "command": {"command", "launcher", "base"},
        "launcher": {"launcher", "base"},
        "training": {"training", "base"},
        "base": {"base"},
    }
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if side(d) not in allowed[side(m)])


def test_the_launchers_side_imports_nothing_of_the_ranks_side():
    graph = import_graph()
    assert {side(m) for m in graph} == {"command", "launcher", "training", "base"}
    assert f"{PACKAGE}.launcher.launch" in graph and f"{PACKAGE}.training.trainer" in graph
    assert crossings(graph) == []


def test_a_crossing_is_caught_lazy_imports_included(tmp_path):
    pkg = tmp_path / PACKAGE
    for sub in ("launcher", "training"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "training" / "tokenizer.py").write_text("from torchtitan_runai.errors import *\n")
    (pkg / "launcher" / "launch.py").write_text("def main():\n    from torchtitan_runai.training import tokenizer\n")
    (pkg / "storage.py").write_text("from .launcher import launch\n")
    assert crossings(import_graph(pkg)) == [
        f"{PACKAGE}.launcher.launch -> {PACKAGE}.training",
        f"{PACKAGE}.launcher.launch -> {PACKAGE}.training.tokenizer",
        f"{PACKAGE}.storage -> {PACKAGE}.launcher",
        f"{PACKAGE}.storage -> {PACKAGE}.launcher.launch",
    ]


def test_base_modules_import_no_feature():
    graph = import_graph()
    assert graph[f"{PACKAGE}.errors"] == set()
    assert graph[f"{PACKAGE}.config"] <= {f"{PACKAGE}.{m}" for m in ("errors", "upstream", "seed")}, graph[
        f"{PACKAGE}.config"
    ]
    assert graph[f"{PACKAGE}.seed"] <= {f"{PACKAGE}.errors"}


def test_the_old_config_export_circle_would_be_caught(tmp_path):
    """The layout before the re-lay: config imported export for its section, export imported
    config lazily, inside a function, for its command line."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "config.py").write_text(
        "from torchtitan_runai.errors import UserError\nfrom torchtitan_runai.export import Export\n"
    )
    (pkg / "export.py").write_text(
        "from torchtitan_runai.errors import UserError\n\n\n"
        "def load_job_config(path):\n"
        "    from torchtitan_runai.config import parse_job_config\n"
        "    return parse_job_config(path)\n"
    )
    graph = import_graph(pkg)
    assert graph[f"{PACKAGE}.export"] == {f"{PACKAGE}.errors", f"{PACKAGE}.config"}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {f"{PACKAGE}.config", f"{PACKAGE}.export"}
    (pkg / "sub").mkdir()
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .a import x\n")
    assert find_cycle({k: v for k, v in import_graph(pkg).items() if ".sub" in k})  # relative, lazy
