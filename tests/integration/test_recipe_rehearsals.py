"""`run_llama_train.sh --rehearse` on every shipped recipe (issue 22): the recipe's own layout and
features on CPU ranks, real launchers, a real SIGTERM, a resume, an HF export loaded by transformers.

TP x FSDP (70B) and PP are run with ``--exact``: their resumed losses equal an uninterrupted run's,
float.hex for float.hex. Debug and 8B (FSDP only) run on 2 ranks, the others on 4 (each kind of
parallelism at 2): the cost is mostly each launch's start-up (4 ranks importing torch on 2 cores).
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from conftest import REPO, launcher_cmd, pod_env

pytestmark = pytest.mark.slow

VERDICT = re.compile(r"^\[rehearse\] (PASS|FAIL|SKIP)\s+([^:]+):", re.M)


def rehearse(tmp_path, recipe: str, ngpu: int, *args: str, timeout: float = 1500):
    started = time.monotonic()
    proc = subprocess.run(
        launcher_cmd("--rehearse", *args),
        env=pod_env(NGPU=str(ngpu), CONFIG_FILE=f"./train_configs/{recipe}.toml", OUTPUT_DIR=str(tmp_path)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(f"{recipe} {' '.join(args)}: rehearsal {time.monotonic() - started:.0f} s")
    return proc, proc.stdout + proc.stderr


def checks(out: str) -> dict[str, str]:
    return {check: verdict for verdict, check in VERDICT.findall(out)}


def assert_proven(proc, out: str, layout: str, *checks_expected: str) -> str:
    assert proc.returncode == 0, out[-5000:]
    found = checks(out)
    expected = ["train", "checkpoint", "SIGTERM", "resume", "HF export", "HF load", *checks_expected]
    assert found == dict.fromkeys(expected, "PASS"), out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("[rehearse] proven on CPU in ") and f"layout {layout}" in last, last
    assert "loaded by transformers" in last
    return last


@pytest.mark.parametrize("recipe", ["debug_model", "llama3_8b"])
def test_fsdp_recipes(tmp_path, recipe):
    proc, out = rehearse(tmp_path, recipe, 2)
    last = assert_proven(proc, out, "FSDP 2")
    assert "resumes," in last
    if recipe == "llama3_8b":  # what the CPU cannot run is said, with what stands in
        assert "[rehearse] note  torch.compile (compile.enable): runs on CPU but costs each launch minutes" in out
        assert "[rehearse] note  model 8B (model.flavor): the debug model" in out
    assert (tmp_path / "rehearsal" / recipe / "hf" / "config.json").is_file()  # OUTPUT_DIR decides


def test_70b_tp_x_fsdp_resumes_bit_identically(tmp_path):
    proc, out = rehearse(tmp_path, "llama3_70b", 4, "--exact")
    last = assert_proven(proc, out, "TP 2 x FSDP 2", "exact resume")
    assert "activation checkpointing full" in last and "checkpoint async_mode async_with_pinned_mem" in last
    assert "resumes bit-identically" in last


def test_405b_float8_emulated_with_tp_x_fsdp(tmp_path):
    proc, out = rehearse(tmp_path, "llama3_405b", 4)
    assert "[rehearse] note  async TP (parallelism.enable_async_tensor_parallel)" in out
    assert "torchao is not installed" not in out, "float8 is emulated with torchao: pip install -e '.[test]'"
    last = assert_proven(proc, out, "TP 2 x FSDP 2")
    assert "float8 (emulated, FSDP float8 all-gather)" in last


def test_pp_x_fsdp_resumes_bit_identically(tmp_path):
    proc, out = rehearse(tmp_path, "debug_model", 4, "--exact", "--parallelism.pipeline_parallel_degree", "2")
    last = assert_proven(proc, out, "PP 2 x FSDP 2", "exact resume")
    assert "resumes bit-identically" in last


def test_a_failure_names_the_recipe_setting(tmp_path):
    proc, out = rehearse(tmp_path, "debug_model", 2, "--optimizer.lr", "-1")
    assert proc.returncode == 1
    assert checks(out) == {"train": "FAIL"}
    assert re.search(r"FAIL  train: exit 2 before step 1; caused by optimizer\.lr \(log: ", out), out[-2000:]
    assert out.strip().splitlines()[-1].startswith("[rehearse] debug_model.toml FAILED at train")


def test_too_few_ranks_for_the_layout_is_one_line(tmp_path):
    proc, out = rehearse(tmp_path, "llama3_70b", 2)
    assert proc.returncode == 2 and "Traceback" not in out
    assert out.strip().splitlines() == [
        "run_llama_train.sh: error: NGPU = 2: the recipe's layout (TP x FSDP) needs at least 4 CPU ranks, a "
        "multiple of 2, to keep each kind of parallelism at 2 or more. Fix: set NGPU=4 for the rehearsal"
    ]
