"""The launcher fetches and checks the tokenizer before any worker starts (issue 16), through the
real launcher, torchrun and huggingface_hub against tests/fakehub.py on 127.0.0.1.

- a token with a trailing newline (a Secret made from a file) works, and no output of the whole
  run, nor any file it writes, contains it;
- the tokenizer is downloaded once, by the launcher; the ranks read the cache;
- a Hub that cannot be reached is one line from the launcher, exit 2, with LOG_RANK=0 (main showed
  "its message is above" for a rank whose output was hidden, after a torchrun restart); nothing is
  written into the checkpoint folder.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers

from conftest import REPO, pod_env, run_launcher  # noqa: E402
from fakehub import FakeHub  # noqa: E402

REPO_ID = "meta-llama/Llama-3.1-8B"
CANARY = "hf_CANARYlaunch0123456789abcdefTOKEN"
TOKENIZER = REPO / "assets" / "rehearsal" / "tokenizer"


def hub_args(tmp: Path) -> list[str]:
    return [
        "--job.dump_folder",
        str(tmp / "dump"),
        "--hub.repo_id",
        REPO_ID,
        "--model.hf_assets_path",
        str(tmp / "no-local-tokenizer"),
        "--hub.cache_dir",
        str(tmp / "hub-cache"),
        "--hub.retries",
        "1",
        "--hub.backoff_s",
        "0.1",
    ]


def test_newline_token_trains_and_never_appears_anywhere(tmp_path):
    with FakeHub(token=CANARY) as hub:
        hub.add_folder(REPO_ID, TOKENIZER)
        proc = run_launcher(
            [
                *hub_args(tmp_path),
                "--training.steps",
                "2",
                "--lr_scheduler.warmup_steps",
                "2",
                "--checkpoint.interval",
                "2",
            ],
            pod_env(NGPU="2", LOG_RANK="all", HF_ENDPOINT=hub.url, HF_TOKEN=CANARY + "\n"),
        )
        gets = hub.gets("/tokenizer.json")
        refused = [r for r in hub.requests if "/resolve/" in r[1] and not r[2]]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "[launch] training finished: step 2 of 2" in out
    assert gets == 1 and not refused  # once, by the launcher, with a valid header; the ranks read the cache
    for piece in (CANARY, CANARY[:16], CANARY[16:]):
        assert piece not in out
    for path in (tmp_path / "dump").rglob("*"):
        if path.is_file():
            assert CANARY.encode()[:16] not in path.read_bytes(), path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_is_the_launchers_one_line_before_any_worker(tmp_path):
    proc = run_launcher(
        hub_args(tmp_path),
        pod_env(NGPU="2", LOG_RANK="0", HF_TOKEN=CANARY, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}"),
        timeout=120,
    )
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(errors) == 1 and "HF_ENDPOINT" in errors[0] and "cannot reach the Hub" in errors[0], proc.stderr
    assert "[rank" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr  # no worker ever started
    assert CANARY not in proc.stdout + proc.stderr
    assert not (tmp_path / "dump").exists()  # nothing claimed, nothing written
