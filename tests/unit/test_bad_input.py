"""Bad input through the launcher: caught before any worker starts.

Every case must be caught before any worker starts: exit 2, exactly one line on stderr that names
the setting, no traceback, and an existing checkpoint left exactly as it was.

The config and environment checks run the launcher's ``main`` in this process, as its command does
(``errors.cli``, prog ``run_llama_train.sh``), with the pod's environment, argv and working
directory set for the case and put back after it; stdout and stderr are captured at the file
descriptors, and a warning a fresh interpreter would print counts as a line on stderr. A few cases
also run as a real ``python -m torchtitan_runai.launch`` (a subprocess): what only a fresh process
shows (its imports, its exit through ``os._exit``). Unwritable and full checkpoint folders use a
read-only bind mount and a tiny tmpfs in a private mount namespace (``unshare -m``; CI runs as
root, which ignores file permissions), so they run in a subprocess too.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE = (REPO / "train_configs/debug_model.toml").read_text()


def toml(tmp: Path, text: str, name="bad.toml") -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def replace(old: str, new: str):
    assert old in BASE, old
    return lambda tmp: toml(tmp, BASE.replace(old, new, 1))


def appended(section: str, line: str):
    return replace(f"[{section}]\n", f"[{section}]\n{line}\n")


def corrupt_tokenizer(tmp: Path) -> Path:
    """The rehearsal tokenizer cut off mid-file (an interrupted copy)."""
    folder = tmp / "tok"
    shutil.copytree(REPO / "assets/rehearsal/tokenizer", folder)
    data = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(data[: len(data) // 2])
    return folder


def empty_token_file(tmp: Path) -> None:
    """A mounted Secret with nothing in it (``HF_TOKEN_PATH`` names it); the stock config."""
    (tmp / "HF_TOKEN").write_text("\n")


def data_file(name: str, content: bytes):
    """A local dataset file ``{tmp}/<name>``; the stock config."""

    def make(tmp: Path) -> None:
        (tmp / name).write_bytes(content)

    return make


LOCAL_DATA = ["--training.dataset", "local", "--training.dataset_path"]

# (id, config file builder or None for the stock debug config, extra args, env, setting named);
# "{tmp}" in an argument or an environment value is the case's folder
CASES = [
    ("missing-config", lambda tmp: str(tmp / "nope.toml"), [], {}, "CONFIG_FILE"),
    ("config-is-a-directory", lambda tmp: str(tmp), [], {}, "CONFIG_FILE"),
    (
        "config-not-utf8",
        lambda tmp: (tmp / "b.toml").write_bytes(b"\xff\xfe[job]") and str(tmp / "b.toml"),
        [],
        {},
        "CONFIG_FILE",
    ),
    ("toml-syntax-error", lambda tmp: toml(tmp, "[job]\ndump_folder = './x'\nsteps = = 3\n"), [], {}, "line 3"),
    ("unknown-key", replace("steps = 30", "stepz = 30"), [], {}, "training.stepz"),
    ("unknown-section", lambda tmp: toml(tmp, BASE + "\n[trainin]\nsteps = 3\n"), [], {}, "trainin"),
    ("wrong-type", replace("steps = 30", 'steps = "ten"'), [], {}, "training.steps"),
    ("seed-too-big", lambda tmp: toml(tmp, BASE + "\n[debug]\nseed = 4294967296\n"), [], {}, "debug.seed"),
    ("seed-negative", None, ["--debug.seed", "-1"], {}, "debug.seed"),
    (
        "degrees-vs-world-size",
        replace("data_parallel_shard_degree = -1", "data_parallel_shard_degree = 3"),
        [],
        {},
        "parallelism",
    ),
    (
        "seq-len-vs-tp",
        replace("seq_len = 128", "seq_len = 127"),
        ["--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1"],
        {},
        "training.seq_len",
    ),
    ("steps-zero", replace("steps = 30", "steps = 0"), [], {}, "training.steps"),
    ("steps-negative", None, ["--training.steps", "-5"], {}, "training.steps"),
    ("missing-tokenizer", None, ["--model.hf_assets_path", "/nonexistent/tokenizer"], {}, "model.hf_assets_path"),
    ("missing-dataset", None, ["--training.dataset_path", "/nonexistent/data"], {}, "training.dataset_path"),
    (
        "empty-dataset",
        None,
        ["--training.dataset", "local", "--training.dataset_path", "{tmp}/empty"],
        {},
        "training.dataset_path",
    ),
    ("interval-zero", None, ["--checkpoint.interval", "0"], {}, "checkpoint.interval"),
    ("keep-latest-1", None, ["--checkpoint.keep_latest_k", "1"], {}, "checkpoint.keep_latest_k"),
    ("unknown-flavor", None, ["--model.flavor", "9000B"], {}, "model.flavor"),
    ("global-batch", None, ["--training.global_batch_size", "7"], {}, "training.global_batch_size"),
    ("seq-len-too-long", None, ["--training.seq_len", "140000"], {}, "training.seq_len"),
    ("warmup-negative", None, ["--lr_scheduler.warmup_steps", "-1"], {}, "lr_scheduler.warmup_steps"),
    # issue 24: optimizer and schedule values (a worker's traceback, or a warning, before)
    ("lr-negative", None, ["--optimizer.lr", "-1e-4"], {}, "optimizer.lr"),
    ("weight-decay-negative", None, ["--optimizer.weight_decay", "-0.1"], {}, "optimizer.weight_decay"),
    ("eps-zero", replace("eps = 1e-8", "eps = 0.0"), [], {}, "optimizer.eps"),
    ("decay-ratio-above-1", None, ["--lr_scheduler.decay_ratio", "1.5"], {}, "lr_scheduler.decay_ratio"),
    ("hang-timeout-negative", None, ["--resilience.hang_timeout_seconds", "-3"], {}, "resilience.hang_timeout_seconds"),
    ("async-mode", None, ["--checkpoint.async_mode", "sometimes"], {}, "checkpoint.async_mode"),
    ("load-step-incomplete", None, ["--checkpoint.load_step", "5"], {}, "checkpoint.load_step"),
    ("load-step-missing", None, ["--checkpoint.load_step", "7"], {}, "checkpoint.load_step"),
    ("unknown-flag", None, ["--training.stepz", "3"], {}, "--training.steps"),
    # issue 24: tyro's box flattened onto one line, without the right spelling
    ("switch-given-false", None, ["--checkpoint.enable", "false"], {}, "Fix: write --checkpoint.no-enable"),
    ("switch-given-true", None, ["--checkpoint.enable=true"], {}, "Fix: write --checkpoint.enable"),
    ("flag-typo", None, ["--training.step", "3"], {}, "did you mean --training.steps"),
    ("key-without-its-section", None, ["--steps", "3"], {}, "--training.steps"),
    ("dry-run-not-first", None, ["--training.steps", "3", "--dry-run"], {}, "--dry-run must come first"),
    ("value-of-the-wrong-type", None, ["--training.steps", "ten"], {}, "Error parsing --training.steps"),
    ("ngpu-not-a-number", None, [], {"NGPU": "two"}, "NGPU"),
    ("max-restarts-negative", None, [], {"MAX_RESTARTS": "-1"}, "MAX_RESTARTS"),
    ("master-port-missing", None, [], {"MASTER_ADDR": "127.0.0.1", "PET_NNODES": "2"}, "MASTER_PORT"),
    # issue 16: found by a new user
    ("nodes-without-master-addr", None, [], {"PET_NNODES": "2"}, "MASTER_ADDR"),
    (
        "node-rank-past-node-count",
        None,
        [],
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "PET_NNODES": "2", "RANK": "5"},
        "RANK",
    ),
    ("stock-llama3-spec", None, ["--model.name", "llama3"], {}, "llama3_runai"),
    # issue 24: a run with no step lines; a node/rank variable that comes alone (ran alone, no note)
    ("log-rank-past-the-nodes-ranks", None, [], {"LOG_RANK": "5"}, "LOG_RANK"),
    ("world-size-without-master-addr", None, [], {"WORLD_SIZE": "2"}, "WORLD_SIZE"),
    ("rank-without-world-size", None, [], {"RANK": "1"}, "RANK"),
    (
        "relative-config-found-nowhere",
        None,
        [],
        {"TORCHTITAN_RUNAI_CALLER_DIR": "{tmp}", "CONFIG_FILE": "configs/mine.toml"},
        "CONFIG_FILE",
    ),
    # issue 24: went to the Hub anonymously
    (
        "hf-token-path-empty-file",
        empty_token_file,
        [],
        {"HF_TOKEN": "", "HF_TOKEN_PATH": "{tmp}/HF_TOKEN"},
        "HF_TOKEN_PATH",
    ),
    # issue 24: a worker's traceback, or the launcher's own, before
    (
        "jsonl-first-line-not-json",
        data_file("d.jsonl", b"text,id\nhello,1\n"),
        [*LOCAL_DATA, "{tmp}/d.jsonl"],
        {},
        "line 1: is not JSON",
    ),
    ("binary-named-jsonl", data_file("d.jsonl", bytes(range(256)) * 16), [*LOCAL_DATA, "{tmp}/d.jsonl"], {}, "UTF-8"),
    (
        "jsonl-without-the-text-column",
        data_file("d.jsonl", b'{"text": "a"}\n{"content": "b"}\n'),
        [*LOCAL_DATA, "{tmp}/d.jsonl"],
        {},
        "data.text_column",
    ),
    (
        "jsonl-text-not-a-string",
        data_file("d.jsonl", b'{"text": ["a", "b"]}\n'),
        [*LOCAL_DATA, "{tmp}/d.jsonl"],
        {},
        "holds a JSON list",
    ),
    (
        "config-with-bom-and-bad-key",
        lambda tmp: (
            (tmp / "bom.toml").write_bytes(b"\xef\xbb\xbf" + BASE.replace("steps = 30", "stepz = 30").encode())
            and str(tmp / "bom.toml")
        ),
        [],
        {},
        "training.stepz",
    ),
    (
        "corrupt-tokenizer-json",
        lambda tmp: corrupt_tokenizer(tmp) and None,
        ["--model.hf_assets_path", "{tmp}/tok"],
        {},
        "tokenizer.json",
    ),
    (
        "hub-offline-empty-cache",
        None,
        [
            "--hub.repo_id",
            "meta-llama/Llama-3.1-8B",
            "--model.hf_assets_path",
            "{tmp}/no-tokenizer",
            "--hub.cache_dir",
            "{tmp}/hub-cache",
        ],
        {"HF_HUB_OFFLINE": "1"},
        "HF_HUB_OFFLINE",
    ),
]


def existing_checkpoint(dump: Path) -> dict[str, tuple[int, int]]:
    step = dump / "checkpoint" / "step-5"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"precious")
    (step / "__0_0.distcp").write_bytes(b"x" * 1000)
    return snapshot(dump / "checkpoint")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def launch(tmp: Path, config: str | None, args: list[str], env: dict, wrap: str | None = None):
    dump = tmp / "dump"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "MASTER_", "JOB_"))}
    full_env.update({"NGPU": "2", "CONFIG_FILE": config or str(REPO / "train_configs/debug_model.toml")})
    full_env.update(env)
    argv = [
        sys.executable,
        "-m",
        "torchtitan_runai.launch",
        "--job.dump_folder",
        str(dump),
        *[a.replace("{tmp}", str(tmp)) for a in args],
    ]
    if wrap:
        argv = ["unshare", "-m", "sh", "-c", f"{wrap} && exec {shlex.join(argv)}"]
    return subprocess.run(argv, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120)


def check(result, setting: str, before: dict, folder: Path):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, lines
    assert setting in lines[0] and "Fix:" in lines[0], lines[0]
    assert "torchrun" not in result.stdout  # no worker started
    assert snapshot(folder) == before


def no_workers(*_args, **_kwargs):
    raise AssertionError("the launcher got as far as starting workers")


def launch_in_process(tmp: Path, config: str | None, args: list[str], env: dict, capfd, monkeypatch, agent=no_workers):
    """``launch`` in this process: the launcher's ``main`` under ``errors.cli``, as its command runs it.

    ``entry()`` is not called: it leaves through ``os._exit``. The caller restores ``os.environ``
    (``pod_environ``); the launcher sets variables there for its workers. ``agent`` stands in for
    torchrun's (``launch.run_agent``)."""
    from torchtitan_runai.errors import cli
    from torchtitan_runai.launcher import launch as launcher

    monkeypatch.setattr(launcher, "run_agent", agent)
    monkeypatch.setattr(
        sys,
        "argv",
        ["run_llama_train.sh", "--job.dump_folder", str(tmp / "dump"), *[a.replace("{tmp}", str(tmp)) for a in args]],
    )
    monkeypatch.chdir(REPO)
    for key in [k for k in os.environ if k.startswith(("PET_", "MASTER_", "JOB_"))]:
        del os.environ[key]
    os.environ.update({"NGPU": "2", "CONFIG_FILE": config or str(REPO / "train_configs/debug_model.toml")})
    os.environ.update({key: value.replace("{tmp}", str(tmp)) for key, value in env.items()})
    capfd.readouterr()  # only what the launcher prints
    with warnings.catch_warnings(record=True) as shown:
        # a fresh interpreter's filters (no -W, no PYTHONWARNINGS): what it would print on stderr
        warnings.resetwarnings()
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        with pytest.raises(SystemExit) as done:
            cli(launcher.main, prog="run_llama_train.sh")
    out, err = capfd.readouterr()
    err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, "") for w in shown)
    return SimpleNamespace(returncode=done.value.code, stdout=out, stderr=err)


@pytest.fixture
def pod_environ():
    """os.environ put back exactly as it was after an in-process launch (the launcher sets worker variables)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("name, make_config, args, env, setting", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_exit_2(
    tmp_path, capfd, monkeypatch, pod_environ, name, make_config, args, env, setting
):
    (tmp_path / "empty").mkdir()
    config = make_config(tmp_path) if make_config else None
    before = existing_checkpoint(tmp_path / "dump")
    result = launch_in_process(tmp_path, config, args, env, capfd, monkeypatch)
    check(result, setting, before, tmp_path / "dump" / "checkpoint")


# The same through a real launcher process: a config mistake, an environment mistake, and the Hub
# path (the most imports before the line).
REAL_PROCESS = [c for c in CASES if c[0] in ("unknown-key", "ngpu-not-a-number", "hub-offline-empty-cache")]


@pytest.mark.parametrize("name, make_config, args, env, setting", REAL_PROCESS, ids=[c[0] for c in REAL_PROCESS])
def test_bad_input_from_a_real_launcher_process(tmp_path, name, make_config, args, env, setting):
    (tmp_path / "empty").mkdir()
    config = make_config(tmp_path) if make_config else None
    before = existing_checkpoint(tmp_path / "dump")
    result = launch(tmp_path, config, args, env)
    check(result, setting, before, tmp_path / "dump" / "checkpoint")


def _unshare_works() -> bool:
    return (
        shutil.which("unshare") is not None
        and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
    )


needs_unshare = pytest.mark.skipif(not _unshare_works(), reason="needs root (or user namespaces) for unshare -m")


@needs_unshare
def test_read_only_checkpoint_folder(tmp_path):
    dump = tmp_path / "dump"
    before = existing_checkpoint(dump)
    folder = dump / "checkpoint"
    result = launch(tmp_path, None, [], {}, wrap=f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}")
    check(result, "checkpoint.folder", before, folder)
    assert "read-only file system" in result.stderr


@needs_unshare
def test_full_checkpoint_folder(tmp_path):
    folder = tmp_path / "dump" / "checkpoint"
    folder.mkdir(parents=True)
    result = launch(tmp_path, None, [], {}, wrap=f"mount -t tmpfs -o size=64k tmpfs {folder}")
    check(result, "checkpoint.folder", {}, folder)
    assert "the disk is full" in result.stderr
