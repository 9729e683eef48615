"""The operating system's answer about a user's path is one line in every command (issue 24, item 4).

No space, a name too long, a read-only file system, no permission, a file where a folder must be, a
folder where a file must be, a missing path: ``errors.describe_os_error`` names the path, what the
system said and the fix; ``errors.cli`` prints it with exit 2 and no traceback. Each command is run
as the user runs it (a real ``python -m`` process) against a real file system: a read-only bind
mount and a full tmpfs in a private mount namespace (``unshare -m``; the tests run as root, which
ignores file permissions), a 300-character name, a path whose parent is a file.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ckpt_util import write_ckpt

from torchtitan_runai import errors
from torchtitan_runai.errors import EXIT_USER_ERROR, cli, describe_os_error

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "train_configs/debug_model.toml")
LONG = "n" * 300  # a name longer than any Linux file system allows (255 bytes)


def _unshare_works() -> bool:
    return (
        shutil.which("unshare") is not None
        and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
    )


needs_unshare = pytest.mark.skipif(not _unshare_works(), reason="needs root (or user namespaces) for unshare -m")


def read_only(folder: Path) -> str:
    return f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"


def full(folder: Path) -> str:
    return f"mount -t tmpfs -o size=64k tmpfs {folder} && (head -c 1M /dev/zero > {folder}/filler 2>/dev/null || true)"


def command(module: str, *args: str, wrap: str | None = None, env: dict | None = None):
    argv = [sys.executable, "-m", module, *args]
    if wrap:
        argv = ["unshare", "-m", "sh", "-c", f"{wrap} && exec {shlex.join(argv)}"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "MASTER_", "JOB_"))}
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run(argv, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=240)


def one_line(result, *names: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == EXIT_USER_ERROR, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, lines
    for name in names:
        assert name in lines[0], lines[0]
    assert "Fix: " in lines[0]
    return lines[0]


# -- the mapping --------------------------------------------------------------------------------


def raised(action) -> OSError:
    with pytest.raises(OSError) as caught:
        action()
    return caught.value


def test_each_errno_of_a_users_path_is_named_with_its_fix(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = {
        errno.ENOTDIR: lambda: (tmp_path / "file" / "sub").mkdir(parents=True),
        errno.ENAMETOOLONG: lambda: (tmp_path / LONG).mkdir(),
        errno.EISDIR: lambda: open(tmp_path, "w"),
        errno.ENOENT: lambda: open(tmp_path / "missing" / "x.png", "w"),
        errno.EEXIST: lambda: (tmp_path / "file").mkdir(exist_ok=True),
    }
    for code, action in cases.items():
        error = raised(action)
        assert error.errno == code
        line = describe_os_error(error).line()
        assert line.startswith(f"path = '{error.filename}': ") and errno.errorcode[code] in line, line
        assert "Fix: " in line
    assert "current directory" in describe_os_error(raised(cases[errno.ENOENT])).fix


def test_a_permission_error_as_root(tmp_path):
    error = raised(lambda: open("/sys/torchtitan-runai.png", "w"))  # sysfs refuses new files, even to root
    if error.errno not in (errno.EACCES, errno.EPERM):
        pytest.skip(f"this /sys answered {error}")
    assert "permission denied" in describe_os_error(error).why


def test_an_os_error_with_no_path_or_another_errno_keeps_its_traceback(monkeypatch):
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device")) is None  # no path: not the user's
    assert describe_os_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused", "host")) is None
    monkeypatch.setattr(sys, "argv", ["prog"])

    def main(argv):
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    with pytest.raises(ConnectionResetError):
        cli(main, prog="mycmd")


def test_cli_prints_the_line_and_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["prog"])

    def main(argv):
        (tmp_path / LONG).write_text("x")

    with pytest.raises(SystemExit) as done:
        cli(main, prog="mycmd")
    assert done.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("mycmd: error: path = ") and "too long" in err and err.count("\n") == 1


# -- every command, as a real process -------------------------------------------------------------


def ledger_job(tmp_path: Path) -> Path:
    """A finished job's output folder with a goodput ledger (as tests/unit/goodput builds it)."""
    sys.path.insert(0, str(REPO / "tests/unit/goodput"))
    from test_report import launch, segment

    from torchtitan_runai.jsonio import write_json_atomic

    ledger = tmp_path / "run1" / "checkpoint" / "goodput"
    ledger.mkdir(parents=True)
    (ledger.parent / "job.json").write_text("{}")
    seg = segment("launch-1", 101.0, resume=0, last=20, saves=(10, 20), durable=20, outcome="finished")
    write_json_atomic(ledger / "launch-000000000100000-1.json", launch("launch-1", 100.0, seg["last_seen"] + 1))
    write_json_atomic(ledger / "segment-000000000101000-2.json", seg)
    return tmp_path / "run1"


@needs_unshare
def test_goodput_on_a_read_only_mount(tmp_path):
    run = ledger_job(tmp_path)
    line = one_line(command("torchtitan_runai.goodput", str(run), wrap=read_only(run)), str(run), "read-only")
    assert "EROFS" in line


@needs_unshare
def test_goodput_onto_a_full_disk(tmp_path):
    run, out = ledger_job(tmp_path), tmp_path / "out"
    out.mkdir()
    result = command("torchtitan_runai.goodput", str(run), "-o", str(out / "g.png"), wrap=full(out))
    assert "ENOSPC" in one_line(result, str(out), "no space left")


@needs_unshare
def test_plots_on_a_read_only_mount(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    tb = tmp_path / "dump" / "tb"
    writer = SummaryWriter(str(tb / "run"))
    for step in range(1, 4):
        writer.add_scalar("loss_metrics/global_avg_loss", 1.0 / step, step)
    writer.close()
    one_line(command("torchtitan_runai.plots", str(tmp_path / "dump"), wrap=read_only(tb)), str(tb), "read-only")


def test_manifest_output_dir_naming_a_file(tmp_path):
    (tmp_path / "deploy").write_text("not a folder")
    args = ["--config", "train_configs/debug_model.toml", "--nodes", "1", "--gpus-per-node", "2", "--image", "i:1"]
    args += ["--pvc", "claim", "--secret", "hf-token", "--name", "job", "--output-dir", str(tmp_path / "deploy")]
    one_line(command("torchtitan_runai.manifest", *args), str(tmp_path / "deploy"), "not a folder")


def test_stage_output_dir_below_a_file(tmp_path):
    (tmp_path / "pvc").write_text("not a folder")
    where = tmp_path / "pvc" / "stage"
    result = command("torchtitan_runai.stage", "--config", CONFIG, "--output-dir", str(where))
    one_line(result, str(where), "ENOTDIR")


def test_export_from_a_name_too_long(tmp_path):
    source = tmp_path / LONG / "step-10"
    result = command("torchtitan_runai.export", str(source), str(tmp_path / "hf"), "--config", CONFIG)
    one_line(result, "too long", "ENAMETOOLONG")


def test_preflight_with_a_dump_folder_name_too_long(tmp_path):
    result = command("torchtitan_runai.preflight", "--config", CONFIG, "--job.dump_folder", str(tmp_path / LONG))
    one_line(result, str(tmp_path / LONG), "ENAMETOOLONG")


def test_launch_with_a_dump_folder_name_too_long_leaves_no_lock(tmp_path):
    dump = tmp_path / LONG
    result = command(
        "torchtitan_runai.launch", "--job.dump_folder", str(dump), env={"NGPU": "2", "CONFIG_FILE": CONFIG}
    )
    one_line(result, str(dump), "ENAMETOOLONG")
    assert list(tmp_path.rglob("lock.json")) == []


# -- the launcher's own full disk while its workers run ---------------------------------------------


def test_the_launchers_full_disk_names_the_newest_checkpoint_and_its_folder(tmp_path):
    from types import SimpleNamespace

    from torchtitan_runai.launcher.launch import launch_os_error

    folder = tmp_path / "dump" / "checkpoint"
    write_ckpt(folder, 3)
    config = SimpleNamespace(
        job=SimpleNamespace(dump_folder=str(tmp_path / "dump")),
        checkpoint=SimpleNamespace(enable=True, folder="checkpoint"),
    )
    error = launch_os_error(OSError(errno.ENOSPC, "No space left on device", str(folder / "x")), config)
    assert error.setting == "checkpoint.folder"
    assert f"step 3 in {folder}" in error.why and "Nothing saved was lost" in error.why and "ENOSPC" in error.why
    assert launch_os_error(OSError(errno.EIO, "I/O error", "x"), config) is None  # not the user's: a traceback


def test_the_launcher_ends_a_full_disk_with_one_line_and_releases_the_lock(tmp_path, capfd, monkeypatch):
    from test_bad_input import launch_in_process

    saved, seen = dict(os.environ), {}

    def agent_hits_a_full_disk(*_args, **_kwargs):
        seen["locked"] = (tmp_path / "dump" / "checkpoint" / "lock.json").is_file()
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "dump" / "tb" / "events"))

    try:
        (tmp_path / "empty").mkdir()
        result = launch_in_process(tmp_path, None, [], {}, capfd, monkeypatch, agent=agent_hits_a_full_disk)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert seen == {"locked": True}  # the agent ran while the launcher held the folder
    line = one_line(result, str(tmp_path / "dump" / "checkpoint"), "disk filled up", "Nothing saved was lost")
    assert "run the same command again" in line
    assert not (tmp_path / "dump" / "checkpoint" / "lock.json").exists()


def test_errors_module_says_what_cli_covers():
    assert "describe_os_error" in errors.__doc__


def test_the_lock_is_released_whatever_fails_after_the_launcher_took_it(tmp_path, capfd, monkeypatch):
    # a name too long for the goodput record beside the lock: lock.json was left behind
    from test_bad_input import launch_in_process

    from torchtitan_runai import goodput

    def record_too_long(config):
        assert (tmp_path / "dump" / "checkpoint" / "lock.json").is_file()  # taken just before
        raise OSError(errno.ENAMETOOLONG, "File name too long", str(tmp_path / "dump" / "checkpoint" / LONG))

    monkeypatch.setattr(goodput, "build_launch_record", record_too_long)
    saved = dict(os.environ)
    try:
        (tmp_path / "empty").mkdir()
        result = launch_in_process(tmp_path, None, [], {}, capfd, monkeypatch)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    one_line(result, "ENAMETOOLONG", "too long")
    assert not (tmp_path / "dump" / "checkpoint" / "lock.json").exists()
