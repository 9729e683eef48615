"""The README's shell examples, run as written in a fresh copy of the repository (issue 16).

Every command of every ```bash block is either run here, in order, in one shell session per
block (exit 0 expected), or listed in CLUSTER_ONLY with the reason it cannot run on a CPU machine
without a cluster; a new example fails this test until it is one or the other. The copy's
``.venv`` is the environment running the tests (what ``make train`` would have made).

The ``make train`` log is then read as a person would (issue 16's "what kubectl logs shows"):
a line budget, none of the lines main used to print, the resolved start-up summary and one
closing line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLUSTER_VARS, REPO

CLUSTER_ONLY = {
    "make test": "the test suite itself (CI runs it)",
    "docker build": "needs a Docker daemon and a registry",
    "kubectl": "needs a cluster",
    "runai submit-dist": "needs a Run:ai cluster",
    "python -m torchtitan_runai.stage": "stages onto a PVC (/outputs) from the gated Hub repo",
    "python -m torchtitan_runai.export /outputs/": "reads a cluster job's checkpoint on its PVC",
    # not cluster-only, but minutes: test_recipe_rehearsals.py runs it, and every other recipe's
    "CONFIG_FILE=./train_configs/llama3_70b.toml ./run_llama_train.sh --rehearse": "run by test_recipe_rehearsals",
}

NOISE = [  # what main's make train printed that a reader does not need (issue 16's list)
    r"OMP_NUM_THREADS",
    r"UserWarning",
    r"lspci",
    r"Peak flops undefined",
    r"already initialized",
    r'"n_layers"',
    r"with \{",
    r"Generating train split",
    r"WARNING - WARNING",
    r"at last step",
    r"global_batch_size=-1",
    r"Building device mesh",
    r"\[GC\]",
    r"Trainer is initialized",
    r"Sleeping \d+ seconds",
    r"Training completed",
    r"purge thread",
    r"Checkpointing active",
    r"model\.safetensors\.index\.json",
    r"Saving the checkpoint",
    r"Autocast",
    r"TensorBoard logging enabled",
]
STEPS, CHECKPOINTS = 30, 3
LINE_BUDGET = STEPS + CHECKPOINTS + 20  # main: 115 lines (117 with an empty datasets cache)


def readme_commands() -> list[list[str]]:
    """Each bash block as a list of commands (backslash continuations joined, comments kept)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [[c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()] for block in blocks]


def cluster_only(command: str) -> bool:
    return any(command.startswith(prefix) for prefix in CLUSTER_ONLY)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """The repository as a fresh clone has it (tracked and new files, nothing ignored)."""
    root = tmp_path_factory.mktemp("fresh") / "torchtitan-runai"
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    stamp = Path(sys.prefix) / ".installed"
    if not stamp.exists():
        pytest.skip("the tests do not run from the venv `make` made (.venv/.installed)")
    (root / ".venv").symlink_to(sys.prefix)
    # the Makefile reinstalls when one of the stamp's prerequisites is newer than the venv's stamp
    for prerequisite in ("pyproject.toml", "requirements.lock"):
        os.utime(root / prerequisite, (stamp.stat().st_mtime - 1,) * 2)
    return root


def shell(root: Path, commands: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    # a reader's terminal: no cluster variables, no venv, and not inside `make test` (MAKELEVEL
    # would make the README's `make train` print "make[1]: Leaving directory ..." last)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "MAKE", "MFLAGS"))
        and k not in (*CLUSTER_VARS, "PYTHONPATH", "VIRTUAL_ENV", "LOG_LEVEL")
    }
    script = "set -e\n" + "\n".join(commands) + "\n"
    return subprocess.run(["bash", "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_example_is_run_or_named_cluster_only():
    commands = [c for block in readme_commands() for c in block if not c.startswith("#")]
    assert "make train" in " ".join(commands)
    for prefix in CLUSTER_ONLY:
        assert any(c.startswith(prefix) for c in commands), f"{prefix!r} is no longer in the README"


def test_readme_examples_run_as_written(fresh):
    # one shell session, as a reader's terminal: `source .venv/bin/activate` holds for what follows;
    # stderr into stdout, in order, as `kubectl logs` shows a pod's output
    script, blocks = ["exec 2>&1"], []
    for block in readme_commands():
        runnable = [c for c in block if not cluster_only(c) and not c.startswith("#")]
        if runnable:
            blocks.append(runnable)
            script += [f"echo '### block {len(blocks)}'", *runnable]
    proc = shell(fresh, script)
    parts = proc.stdout.split("### block ")[1:]
    assert proc.returncode == 0, f"block {len(parts)}: {blocks[len(parts) - 1]}\n{parts[-1][-4000:]}"
    assert len(parts) == len(blocks)
    assert (fresh / "outputs" / "debug_model" / "tb" / "training_curves.png").is_file()
    assert (fresh / "outputs" / "debug-hf" / "model.safetensors").is_file()
    first = next(i for i, b in enumerate(blocks) if "make train" in " ".join(b))
    check_person_log(parts[first].split("\n", 1)[1].strip())
    again = shell(fresh, ["make train"])  # "Run make train after it finished: it says the run is complete"
    assert again.returncode == 0 and "the run is complete" in again.stdout + again.stderr


def check_person_log(log: str) -> None:
    lines = log.splitlines()
    assert len(lines) <= LINE_BUDGET, f"{len(lines)} lines:\n{log}"
    for pattern in NOISE:
        assert not re.search(pattern, log), f"{pattern!r} is back:\n{log}"
    assert sum(1 for line in lines if re.search(r"step:\s*\d+\s+loss:", line)) == STEPS
    assert "global_batch_size=8" in log and "starting fresh" in log
    # every checkpoint has its line, the final one included
    assert sum(bool(re.search(r"checkpoint at step \d+ saved in", line)) for line in lines) == CHECKPOINTS
    assert not [line for line in lines if re.search(r"step:.*(memory:|tflops:|mfu:|n/a)", line)]  # CPU
    # one goodput figure: the launcher's at its exit, the whole job (rank 0's last one is DEBUG)
    assert sum(bool(re.search(r"goodput.*: \d+\.\d% of", line)) for line in lines) == 1
    assert re.match(
        r"\[launch\] goodput of the whole job \(every launch, start-up to exit\): \d+\.\d% of .*start-up .*; "
        r"0 restart\(s\), 3 save\(s\)$",
        lines[-3],
    ), lines[-3]
    assert re.fullmatch(
        r"\[launch\] training finished: step 30 of 30 in \d+:\d\d:\d\d; newest checkpoint "
        r"outputs/debug_model/checkpoint/step-30",
        lines[-2],
    ), lines[-2]
    assert lines[-1] == (  # what to do next
        "[launch] next: export the weights for Hugging Face: python -m torchtitan_runai.export "
        "outputs/debug_model/checkpoint/step-30 outputs/debug_model/hf --config ./train_configs/debug_model.toml; "
        "loss curves outputs/debug_model/tb/training_curves.png; "
        "goodput breakdown: python -m torchtitan_runai.goodput outputs/debug_model"
    ), lines[-1]
