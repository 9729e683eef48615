"""Cluster specs (torchtitan_runai.manifest): structure, Kubernetes schema, secrets, operator env,
and the torchrun command run_llama_train.sh derives from that env."""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Mapping

import crd_check
import kubernetes_validate
import pytest
import yaml

from torchtitan_runai import storage
from torchtitan_runai.errors import UserError
from torchtitan_runai.job import parse_job_config
from torchtitan_runai.launcher import manifest, preflight
from torchtitan_runai.launcher.manifest import JobSpec

REPO = Path(__file__).resolve().parents[3]
K8S_VERSION = kubernetes_validate.latest_version()
FAKE_TOKEN = "hf_FAKEtokenFORtestsONLY0123456789"

CONFIG = """\
[job]
dump_folder = "./outputs"
[model]
name = "llama3"
flavor = "8B"
[checkpoint]
enable = true
folder = "checkpoint"
keep_latest_k = {keep}
[metrics]
enable_tensorboard = true
save_tb_folder = "{tb}"
"""


def spec(nodes: int = 2, gpus: int = 8, **kw) -> JobSpec:
    base = dict(
        name="llama3-8b",
        config_file="./train_configs/llama3_8b.toml",
        nodes=nodes,
        gpus_per_node=gpus,
        image="nvcr.io/org/torchtitan-runai:0.1",
        pvc_claim="my-pvc",
        mount_path="/outputs",
        secret="hf-token",
        grace_seconds=300,
    )
    base.update(kw)
    return JobSpec(**base)


@pytest.fixture
def repo(tmp_path):
    """A repo root with a config, for the CLI (CONFIG_FILE is relative to it)."""
    (tmp_path / "train_configs").mkdir()
    (tmp_path / "train_configs" / "llama3_8b.toml").write_text(CONFIG.format(keep=10, tb="tb"))
    return tmp_path


def run_cli(args, cwd, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "torchtitan_runai.manifest", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


CLI = [
    "--config",
    "train_configs/llama3_8b.toml",
    "--nodes",
    "2",
    "--gpus-per-node",
    "8",
    "--image",
    "nvcr.io/org/torchtitan-runai:0.1",
    "--pvc",
    "my-pvc:/outputs",
    "--name",
    "llama3-8b",
    "--secret",
    "hf-token",
]


# --- Kubernetes schema (core objects) ---------------------------------------------------------


def validate(obj):
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_pytorchjob_pod_templates_validate_as_core_podtemplates(nodes):
    job = manifest.build_pytorchjob(spec(nodes))
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"llama3-8b-{role.lower()}"},
                "template": replica["template"],
            }
        )


def test_schema_validation_catches_a_broken_template():
    # proves the check has teeth: a typo'd field fails strict validation
    tmpl = manifest.build_pod_template(spec(), master=True)
    tmpl["spec"]["terminationGracePeriod"] = tmpl["spec"].pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": tmpl})


def trainjob_pod(job):
    """(trainer, the pod settings the TrainJob patches in, the node container's patch) of any version."""
    spec = job["spec"]
    if "runtimePatches" in spec:
        (patch,) = spec["runtimePatches"]
        (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        assert replicated["name"] == "node"
        pod = replicated["template"]["spec"]["template"]["spec"]
    elif "podTemplateOverrides" in spec:
        (override,) = spec["podTemplateOverrides"]
        assert override["targetJobs"] == [{"name": "node"}]
        pod = override["spec"]
    else:
        (override,) = spec["podSpecOverrides"]
        assert override["targetJobs"] == [{"name": "node"}]
        pod = {k: v for k, v in override.items() if k != "targetJobs"}
    (container,) = pod["containers"]
    return spec["trainer"], pod, container


@pytest.mark.parametrize("version", manifest.TRAINER_VERSIONS)
def test_trainjob_pod_after_overrides_validates_as_core_pod(version):
    # what the Trainer would build: the runtime's 'node' container with our trainer fields and
    # the patch (runtimePatches / podTemplateOverrides / podSpecOverrides) applied
    trainer, pod, patch = trainjob_pod(manifest.build_trainjob(spec(), version))
    container = {
        "name": "node",
        "image": trainer["image"],
        "command": trainer["command"],
        "env": trainer["env"],
        "resources": trainer["resourcesPerNode"],
        "volumeMounts": patch["volumeMounts"],
    }
    validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "llama3-8b-node-0-0"},
            "spec": {
                **{k: v for k, v in pod.items() if k != "containers"},
                "containers": [container],
                "restartPolicy": "Never",
            },
        }
    )


# --- operator structure (CRDs: checked against the documented fields) ------------------------


PYTORCHJOB_SPEC_KEYS = {"nprocPerNode", "runPolicy", "pytorchReplicaSpecs", "elasticPolicy"}
REPLICA_KEYS = {"replicas", "restartPolicy", "template"}


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_pytorchjob_structure(nodes):
    job = manifest.build_pytorchjob(spec(nodes, backoff_limit=7))
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert set(job["spec"]) <= PYTORCHJOB_SPEC_KEYS
    assert job["spec"]["nprocPerNode"] == "8"  # a string in the v1 API
    assert job["spec"]["runPolicy"] == {"backoffLimit": 7}
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {"replicas": 0})["replicas"] == nodes - 1
    for role, replica in replicas.items():
        assert set(replica) == REPLICA_KEYS
        assert replica["restartPolicy"] == "ExitCode"  # 128+ (preempted: 143) retried, 1-127 final
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # the operator injects env only into this one
        assert "command" not in container and "args" not in container  # image entrypoint (tini) stays
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert pod["terminationGracePeriodSeconds"] == 300
        # the launcher and preflight budget the SIGTERM checkpoint with the grace period the pod has
        assert {"name": "TERMINATION_GRACE_PERIOD_SECONDS", "value": "300"} in container["env"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert ("ports" in container) == (role == "Master")
    master_port = replicas["Master"]["template"]["spec"]["containers"][0]["ports"][0]
    assert master_port == {"name": "pytorchjob-port", "containerPort": manifest.PYTORCHJOB_PORT}


@pytest.mark.parametrize("version", manifest.TRAINER_VERSIONS)
def test_trainjob_structure(version):
    job = manifest.build_trainjob(spec(4, grace_seconds=420), version)
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    trainer, pod, container = trainjob_pod(job)
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8  # an integer: int32 from 2.2
    assert trainer["command"] == manifest.ENTRYPOINT
    assert set(container) == {"name", "volumeMounts"} and container["name"] == "node"
    grace_env = {"name": "TERMINATION_GRACE_PERIOD_SECONDS", "value": "420"}
    if version == "2.3":  # the pods' grace period is the TrainJob's own: the launcher is told it too
        assert pod["terminationGracePeriodSeconds"] == 420 and grace_env in trainer["env"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert job["spec"]["runtimePatches"][0]["manager"] == manifest.RUNTIME_PATCH_MANAGER
    else:  # the runtime's: nothing here may claim a value
        assert "terminationGracePeriodSeconds" not in pod and grace_env not in trainer["env"]


def test_trainjob_default_is_trainer_2_3_and_unknown_versions_are_refused():
    assert manifest.TRAINER_DEFAULT == "2.3"
    assert "runtimePatches" in manifest.build_trainjob(spec())["spec"]
    with pytest.raises(UserError, match="--trainer-version"):
        manifest.build_trainjob(spec(), "2.2")


def test_entrypoint_matches_the_dockerfile():
    text = (REPO / "Dockerfile").read_text()
    line = next(line for line in text.splitlines() if line.startswith("ENTRYPOINT"))
    assert yaml.safe_load(line.split(None, 1)[1]) == manifest.ENTRYPOINT
    assert f"APP_DIR={manifest.APP_DIR}" in text and f"USER {manifest.CONTAINER_UID}" in text


# --- storage, shm, secrets --------------------------------------------------------------------


def pods(nodes=2, **kw):
    """(env list, volumes, mounts) of every pod spec that the builders emit."""
    s = spec(nodes, **kw)
    for replica in manifest.build_pytorchjob(s)["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        yield pod["containers"][0]["env"], pod["volumes"], pod["containers"][0]["volumeMounts"]
    for version in manifest.TRAINER_VERSIONS:
        trainer, pod, container = trainjob_pod(manifest.build_trainjob(s, version))
        yield trainer["env"], pod["volumes"], container["volumeMounts"]


def test_pvc_at_output_dir_shm_in_memory_token_from_secret():
    for env, volumes, mounts in pods(mount_path="/mnt/ckpt"):
        by_name = {e["name"]: e for e in env}
        assert by_name["OUTPUT_DIR"]["value"] == "/mnt/ckpt"
        assert by_name["CONFIG_FILE"]["value"] == "./train_configs/llama3_8b.toml"
        assert by_name["NGPU"]["value"] == "8"
        assert by_name["HF_TOKEN"] == {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}},
        }
        vols, mnts = {v["name"]: v for v in volumes}, {m["mountPath"]: m["name"] for m in mounts}
        assert vols[mnts["/mnt/ckpt"]]["persistentVolumeClaim"] == {"claimName": "my-pvc"}
        assert vols[mnts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_runai_command():
    argv = manifest.build_runai_command(spec(3, project="team-a"))
    assert argv[:3] == ["runai", "submit-dist", "pytorch"]
    assert "--workers=2" in argv and "--large-shm" in argv
    pairs = list(zip(argv, argv[1:]))
    assert ("-g", "8") in pairs and ("-p", "team-a") in pairs
    assert ("--existing-pvc", "claimname=my-pvc,path=/outputs") in pairs
    assert ("-e", "OUTPUT_DIR=/outputs") in pairs  # same path as the PVC mount
    assert ("-e", "HF_TOKEN=SECRET:hf-token,HF_TOKEN") in pairs
    single = manifest.build_runai_command(spec(1))
    assert single[:2] == ["runai", "submit"] and not any(a.startswith("--workers") for a in single)
    # the rendered script is the same argv
    script = manifest.render_runai(spec(3, project="team-a"))
    assert shlex.split(script.replace("\\\n", " ")) == argv


# --- CLI --------------------------------------------------------------------------------------


def test_cli_writes_parseable_specs_and_never_the_token(repo):
    out = repo / "out"
    res = run_cli([*CLI, "--pvc-size", "10Ti", "--output-dir", str(out)], repo, {"HF_TOKEN": FAKE_TOKEN})
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["pytorchjob.yaml", "runai-v2.sh", "runai.sh", "trainjob.yaml"]
    pj = yaml.safe_load((out / "pytorchjob.yaml").read_text())
    tj = yaml.safe_load((out / "trainjob.yaml").read_text())
    assert pj == manifest.build_pytorchjob(
        spec(
            grace_seconds=pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
                "terminationGracePeriodSeconds"
            ]
        )
    )
    assert tj["spec"]["trainer"]["numNodes"] == 2
    script = (out / "runai.sh").read_text()
    for name in ("runai.sh", "runai-v2.sh"):
        assert subprocess.run(["bash", "-n", str(out / name)]).returncode == 0
        assert os.access(out / name, os.X_OK)
    for text in (
        script,
        (out / "runai-v2.sh").read_text(),
        (out / "pytorchjob.yaml").read_text(),
        (out / "trainjob.yaml").read_text(),
        res.stdout,
        res.stderr,
    ):
        assert FAKE_TOKEN not in text


def test_cli_stdout_single_format(repo):
    res = run_cli([*CLI, "--format", "pytorchjob"], repo)
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert [d["kind"] for d in docs] == ["PyTorchJob"]


def test_cli_grace_period_follows_the_recipe(repo):
    res = run_cli([*CLI, "--format", "pytorchjob"], repo)
    pod = yaml.safe_load(res.stdout)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == storage.recommended_grace_seconds(storage.checkpoint_bytes("8B"), 2)
    res = run_cli([*CLI, "--format", "pytorchjob", "--grace-period", "900"], repo)
    assert "terminationGracePeriodSeconds: 900" in res.stdout


@pytest.mark.parametrize(
    "change,setting",
    [
        ({"--config": "train_configs/missing.toml"}, "--config"),
        ({"--name": "Llama_8B"}, "--name"),
        ({"--pvc": "my-pvc:relative/path"}, "--pvc"),
        ({"--nodes": "0"}, "--nodes"),
        ({"--secret": "HF Token"}, "--secret"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(repo, change, setting):
    args = list(CLI)
    for key, value in change.items():
        args[args.index(key) + 1] = value
    res = run_cli(args, repo)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert f"error: {setting}" in res.stderr


def test_cli_config_outside_repo_is_a_user_error(repo, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "c.toml"
    elsewhere.write_text(CONFIG.format(keep=10, tb="tb"))
    args = list(CLI)
    args[args.index("--config") + 1] = str(elsewhere)
    res = run_cli(args, repo)
    assert res.returncode == 2 and "not in the image" in res.stderr


def test_cli_retention_that_can_fill_the_pvc_is_refused(repo):
    res = run_cli([*CLI, "--pvc-size", "1Ti"], repo)  # keep_latest_k=10 of 96 GB: 11 don't fit in 1 TiB
    assert res.returncode == 2 and "keep_latest_k = 9" in res.stderr


def test_cli_absolute_tb_folder_is_refused(repo):
    (repo / "train_configs" / "llama3_8b.toml").write_text(CONFIG.format(keep=10, tb="/tmp/tb"))
    res = run_cli(CLI, repo)
    assert res.returncode == 2 and "metrics.save_tb_folder" in res.stderr


# --- operator environment ---------------------------------------------------------------------


# What each operator injects into each pod (docs/cluster.md): the tests feed it to run_llama_train.sh --dry-run.
def operator_env(
    spec: manifest.JobSpec, operator: str, pod_index: int, secrets: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The container environment of pod ``pod_index`` as the operator creates it: our spec's env
    (Secret references resolved from ``secrets``, {secret name: {key: value}} flattened as
    ``{"<secret>/<key>": value}``) plus what the operator adds."""
    if operator not in manifest.FORMATS:
        raise ValueError(f"operator must be one of {manifest.FORMATS}, not {operator!r}")
    if not 0 <= pod_index < spec.nodes:
        raise ValueError(f"pod_index {pod_index} outside 0..{spec.nodes - 1}")
    secrets = secrets or {}
    env = dict(spec.env())
    token = secrets.get(f"{spec.secret}/{manifest.HF_TOKEN_KEY}")
    if token is not None:
        env[manifest.HF_TOKEN_KEY] = token
    nnodes, nproc = str(spec.nodes), str(spec.gpus_per_node)
    if operator == "trainjob":
        env.update(
            PET_NNODES=nnodes,
            PET_NPROC_PER_NODE=nproc,
            PET_NODE_RANK=str(pod_index),
            PET_MASTER_ADDR=f"{spec.name}-node-0-0.{spec.name}",
            PET_MASTER_PORT=str(manifest.TRAINJOB_PORT),
        )
        return env
    if operator == "runai":
        env.update(JOB_NAME=spec.name, RUNAI_NUM_OF_GPUS=nproc, NODE_NAME=f"gpu-node-{pod_index}")
        if spec.nodes == 1:  # runai submit (not -dist): a plain pod, no rendezvous variables
            return env
        # submit-dist sets no nprocPerNode: the operator says "auto" and WORLD_SIZE = pods
        nproc_env, world = "auto", nnodes
    else:
        nproc_env, world = nproc, str(spec.nodes * spec.gpus_per_node)
    master = f"{spec.name}-master-0"
    env.update(
        MASTER_ADDR=master,
        PET_MASTER_ADDR=master,
        MASTER_PORT=str(manifest.PYTORCHJOB_PORT),
        PET_MASTER_PORT=str(manifest.PYTORCHJOB_PORT),
        RANK=str(pod_index),
        PET_NODE_RANK=str(pod_index),
        WORLD_SIZE=world,
        PET_NNODES=nnodes,
        PET_NPROC_PER_NODE=nproc_env,
        PYTHONUNBUFFERED="1",
    )
    return env


def test_operator_env_shapes():
    s = spec(2)
    secrets = {"hf-token/HF_TOKEN": FAKE_TOKEN}
    pj1 = operator_env(s, "pytorchjob", 1, secrets)
    assert pj1["MASTER_ADDR"] == pj1["PET_MASTER_ADDR"] == "llama3-8b-master-0"
    assert (
        pj1["RANK"],
        pj1["PET_NODE_RANK"],
        pj1["WORLD_SIZE"],
        pj1["PET_NNODES"],
        pj1["PET_NPROC_PER_NODE"],
        pj1["MASTER_PORT"],
    ) == ("1", "1", "16", "2", "8", "23456")
    assert pj1["HF_TOKEN"] == FAKE_TOKEN and pj1["OUTPUT_DIR"] == "/outputs"
    ra = operator_env(s, "runai", 0)
    assert (ra["PET_NPROC_PER_NODE"], ra["WORLD_SIZE"], ra["JOB_NAME"]) == ("auto", "2", "llama3-8b")
    assert "HF_TOKEN" not in ra  # no secret given, nothing invented
    tj = operator_env(s, "trainjob", 1)
    assert tj["PET_MASTER_ADDR"] == "llama3-8b-node-0-0.llama3-8b" and tj["PET_MASTER_PORT"] == "29500"
    assert not {"MASTER_ADDR", "WORLD_SIZE", "RANK"} & set(tj)
    single = operator_env(spec(1), "runai", 0)
    assert not any(k.startswith("PET_") or k in ("MASTER_ADDR", "RANK") for k in single)
    with pytest.raises(ValueError):
        operator_env(s, "pytorchjob", 2)


def torchrun_options(line: str) -> tuple[list[str], dict[str, str]]:
    tokens = shlex.split(line)
    opts: dict[str, str] = {}
    for i, tok in enumerate(tokens):
        if tok.startswith("--"):
            key, eq, value = tok[2:].partition("=")
            if not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                value = tokens[i + 1]
            opts.setdefault(key.replace("-", "_"), value)
    return tokens, opts


CASES = [("pytorchjob", 2, 1), ("runai", 2, 0), ("trainjob", 2, 1), ("runai", 1, 0)]


def dry_run(operator: str, nodes: int, pod: int):
    """Feed the env the operator would inject for our spec to run_llama_train.sh --dry-run."""
    script = REPO / "run_llama_train.sh"
    if not script.exists():
        pytest.skip("run_llama_train.sh is not written yet (lead); this test runs once it exists")
    configs = [c for c in ("llama3_8b.toml", "debug_model.toml") if (REPO / "train_configs" / c).exists()]
    if not configs:
        pytest.skip("no train config under train_configs/ yet (lead)")
    s = spec(nodes, config_file=f"./train_configs/{configs[0]}")
    env = operator_env(s, operator, pod, {"hf-token/HF_TOKEN": FAKE_TOKEN})
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    res = subprocess.run(
        ["bash", str(script), "--dry-run"], cwd=REPO, env={**base, **env}, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert FAKE_TOKEN not in res.stdout + res.stderr
    last = res.stdout.strip().splitlines()[-1]
    return s, env, last, *torchrun_options(last)


@pytest.mark.parametrize("operator,nodes,pod", CASES)
def test_operator_env_through_run_llama_train_dry_run(operator, nodes, pod):
    s, env, last, tokens, opts = dry_run(operator, nodes, pod)
    assert "torchrun" in Path(tokens[0]).name or "torch.distributed.run" in tokens, last
    assert opts.get("nproc_per_node") == "8", last
    assert any(t.endswith(s.config_file.lstrip(".")) for t in tokens), last
    if nodes == 1:
        assert opts.get("nnodes", "1") in ("1", "1:1"), last
        return
    assert opts.get("nnodes") in ("2", "2:2"), last
    assert opts.get("node_rank", str(pod)) == str(pod), last
    host = env.get("MASTER_ADDR") or env["PET_MASTER_ADDR"]
    port = env.get("MASTER_PORT") or env["PET_MASTER_PORT"]
    endpoint = opts.get("rdzv_endpoint") or f"{opts.get('master_addr')}:{opts.get('master_port')}"
    assert endpoint == f"{host}:{port}", last


def test_dry_run_puts_outputs_on_the_pvc():
    s, env, last, tokens, opts = dry_run("pytorchjob", 2, 0)
    assert opts.get("job.dump_folder") == s.mount_path, last


# --- deploy/ examples are what the generator emits --------------------------------------------


def test_deploy_examples_are_current(tmp_path):
    example = REPO / "deploy" / "llama3-8b-2x8"
    header = (example / "pytorchjob.yaml").read_text().splitlines()[0]
    assert header.startswith("# Generated by: python -m torchtitan_runai.manifest ")
    if not (REPO / "train_configs" / "llama3_8b.toml").exists():
        pytest.skip("train_configs/llama3_8b.toml is not written yet (lead)")
    argv = shlex.split(header.split("python -m torchtitan_runai.manifest ", 1)[1])
    out = tmp_path / "regen"
    argv[argv.index("--output-dir") + 1] = str(out)
    res = run_cli(argv, REPO)
    assert res.returncode == 0, res.stderr
    for name in ("runai.sh", "runai-v2.sh", "pytorchjob.yaml", "trainjob.yaml"):
        regen = (out / name).read_text().replace(str(out), "deploy/llama3-8b-2x8")
        assert regen == (example / name).read_text(), f"deploy/llama3-8b-2x8/{name} is stale"


# --- issue 16: the v2 CLI, and a usable fix for a bad claim name -------------------------------


def test_runai_v2_command_sets_grace_period_backoff_and_the_token_from_the_secret():
    argv = manifest.build_runai_v2_command(spec(3, project="team-a", grace_seconds=420, backoff_limit=4))
    assert argv[:5] == ["runai", "training", "pytorch", "submit", "llama3-8b"]
    pairs = list(zip(argv, argv[1:]))
    assert ("--workers", "2") in pairs and ("-g", "8") in pairs and ("--master-gpu-devices-request", "8") in pairs
    assert ("-p", "team-a") in pairs and "--large-shm" in argv
    assert ("--existing-pvc", "claimname=my-pvc,path=/outputs") in pairs
    assert ("--termination-grace-period", "420s") in pairs and ("--backoff-limit", "4") in pairs
    assert ("-e", "TERMINATION_GRACE_PERIOD_SECONDS=420") in pairs  # the launcher's grace budget
    assert ("--env-secret", "HF_TOKEN=hf-token,key=HF_TOKEN") in pairs  # the default: the newer CLI's flag
    mounted = manifest.build_runai_v2_command(spec(3), "secret-volume")
    pairs = list(zip(mounted, mounted[1:]))
    assert ("--secret-volume", f"path={manifest.SECRET_MOUNT},name=hf-token") in pairs
    assert ("-e", f"HF_TOKEN_PATH={manifest.SECRET_MOUNT}/HF_TOKEN") in pairs and "--env-secret" not in mounted
    for either in (argv, mounted):  # never the value in -e, never a v1 SECRET: form
        assert not any(a.startswith("HF_TOKEN=") for flag, a in zip(either, either[1:]) if flag == "-e")
        assert not any("SECRET:" in a for a in either)
    single = manifest.build_runai_v2_command(spec(1))
    assert single[:5] == ["runai", "training", "standard", "submit", "llama3-8b"] and "--workers" not in single


FAKE_RUNAI = """#!/usr/bin/env bash
# A stand-in for the Run:ai CLI: --help lists --env-secret when FAKE_RUNAI_ENV_SECRET=1; a submit
# writes its argv (one per line) to $FAKE_RUNAI_ARGV.
for a in "$@"; do
    if [[ $a == --help ]]; then
        echo "  -e, --environment stringArray   Set environment variables in the container"
        [[ ${FAKE_RUNAI_ENV_SECRET:-0} == 1 ]] && echo "      --env-secret stringArray    ENV=SECRET,key=KEY"
        echo "      --secret-volume stringArray Secret volumes to use in the workload"
        exit 0
    fi
done
printf '%s\n' "$@" > "$FAKE_RUNAI_ARGV"
"""


@pytest.mark.parametrize("nodes", [1, 3])
@pytest.mark.parametrize("has_env_secret", [True, False])
def test_runai_v2_script_uses_env_secret_where_the_cli_has_it(tmp_path, nodes, has_env_secret):
    # the script asks the installed CLI (its --help) and submits with --env-secret or the mounted Secret
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "runai").write_text(FAKE_RUNAI)
    (bin_dir / "runai").chmod(0o755)
    script = tmp_path / "runai-v2.sh"
    s = spec(nodes, project="team-a")
    script.write_text(manifest.render(s, "runai-v2", "python -m torchtitan_runai.manifest ..."))
    argv_file = tmp_path / "argv"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_RUNAI_ENV_SECRET": "1" if has_env_secret else "0",
        "FAKE_RUNAI_ARGV": str(argv_file),
    }
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    mode = "env-secret" if has_env_secret else "secret-volume"
    assert ["runai", *argv_file.read_text().splitlines()] == manifest.build_runai_v2_command(s, mode)


@pytest.mark.parametrize("claim", ["CLAIM", "My_Claim", "-x", "claim-"])
def test_bad_claim_name_says_what_a_claim_name_is_and_suggests_a_valid_one(claim):
    # main answered --pvc CLAIM:/outputs (the README's placeholder) with "pass --pvc CLAIM ..."
    with pytest.raises(UserError) as err:
        manifest.parse_pvc(f"{claim}:/outputs")
    line = err.value.line()
    assert "lowercase DNS names" in line
    suggested = line.split("e.g. --pvc ", 1)[1].split()[0]
    assert manifest.parse_pvc(suggested) == ("llama3-outputs", "/outputs")


def test_claim_names_may_start_with_a_digit_and_hold_dots():
    assert manifest.parse_pvc("0-outputs.fast") == ("0-outputs.fast", "/outputs")


# --- issue 23: every spec against the operators' real CRDs ----------------------------------------

RECIPES = ("llama3_8b", "llama3_70b", "llama3_405b")
PYTORCHJOB_CRDS = ("pytorchjobs-v1.8.1.yaml", "pytorchjobs-v1.9.0.yaml")
TRAINJOB_CRDS = {"2.3": "trainjobs-v2.3.0.yaml", "2.1": "trainjobs-v2.1.0.yaml", "2.0": "trainjobs-v2.0.1.yaml"}


@pytest.fixture(scope="module")
def crds():
    """The CRD checker, or a skip with the one line that says why (a user's clone has no ../shared)."""
    if not crd_check.CRD_DIR.is_dir():
        pytest.skip(f"no Kubeflow CRDs at {crd_check.CRD_DIR} (../shared/reference/kubeflow-crds; TTR_KUBEFLOW_CRDS)")
    return crd_check


def recipe_spec(recipe: str, nodes: int, **kw) -> JobSpec:
    """The spec the generator builds for a recipe (its grace period from the recipe's checkpoint size)."""
    flavor = {"llama3_8b": "8B", "llama3_70b": "70B", "llama3_405b": "405B"}[recipe]
    grace = storage.recommended_grace_seconds(storage.checkpoint_bytes(flavor), nodes)
    return spec(
        nodes, name=recipe.replace("_", "-"), config_file=f"./train_configs/{recipe}.toml", grace_seconds=grace, **kw
    )


@pytest.mark.parametrize("nodes", [1, 2, 4])
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_pytorchjob_is_accepted_by_training_operator_1_8_and_1_9(crds, recipe, nodes):
    job = manifest.build_pytorchjob(recipe_spec(recipe, nodes))
    for crd in PYTORCHJOB_CRDS:
        assert crds.check(job, crd) == [], crd


@pytest.mark.parametrize("nodes", [1, 2, 4])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("version", manifest.TRAINER_VERSIONS)
def test_every_trainjob_is_accepted_by_the_trainer_it_targets_only(crds, version, recipe, nodes):
    job = manifest.build_trainjob(recipe_spec(recipe, nodes), version)
    for target, crd in TRAINJOB_CRDS.items():
        problems = crds.check(job, crd)
        if target == version:
            assert problems == [], crd
        else:  # the per-job pod field has another name in every release: the wrong flag is refused
            assert any(p.startswith('unknown field "spec.') for p in problems), (crd, problems)


def test_the_default_trainjob_is_trainer_2_3s(crds):
    assert crds.check(manifest.build_trainjob(spec()), "trainjobs-v2.3.0.yaml") == []


def mutated(obj, path, value=None, delete=False):
    obj = copy.deepcopy(obj)
    node = obj
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return obj


PATCH = ["spec", "runtimePatches", 0]
POD = [*PATCH, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", 0, "template", "spec", "template", "spec"]


@pytest.mark.parametrize(
    "path,value,delete,expected",
    [
        (["spec", "podTemplateOverrides"], [], False, 'unknown field "spec.podTemplateOverrides"'),
        ([*POD, "terminationGracePeriod"], 300, False, "unknown field"),  # a typo'd field
        ([*POD, "containers", 0, "resources"], {}, False, "unknown field"),  # not patchable in 2.3
        (["spec", "trainer", "numProcPerNode"], "8", False, "is not of type 'integer'"),  # int-or-string before 2.2
        ([*POD, "terminationGracePeriodSeconds"], -1, False, "less than the minimum"),
        ([*PATCH, "manager"], None, True, "'manager' is a required property"),
        (["spec", "trainer", "resourcesPerNode", "limits", "nvidia.com/gpu"], "8 GPUs", False, "does not match"),
        (["metadata", "name"], "Llama3_8B", False, "metadata.name must match RFC 1035"),  # CEL
        (["metadata", "name"], "x" * 64, False, "no more than 63 characters"),  # CEL
        (["spec", "managedBy"], "someone-else", False, "ManagedBy must be"),  # CEL
    ],
)
def test_the_crd_check_refuses_what_the_api_server_refuses(crds, path, value, delete, expected):
    # proves the check has teeth: each mutation of an accepted TrainJob is one refusal
    job = manifest.build_trainjob(spec())
    assert crds.check(job, "trainjobs-v2.3.0.yaml") == []
    problems = crds.check(mutated(job, path, value, delete), "trainjobs-v2.3.0.yaml")
    assert any(expected in p for p in problems), problems


def test_the_crd_check_refuses_a_broken_pytorchjob(crds):
    job = manifest.build_pytorchjob(spec())
    master = ["spec", "pytorchReplicaSpecs", "Master"]
    for path, value in [
        ([*master, "replica"], 1),  # unknown field
        ([*master, "replicas"], "one"),  # type
        (["spec", "nprocPerNode"], 8),  # a string in the v1 API
        ([*master, "template", "spec", "containers", 0, "ports", 0, "containerPort"], 2**31),  # int32
    ]:
        for crd in PYTORCHJOB_CRDS:
            assert crds.check(mutated(job, path, value), crd) != [], (path, crd)


def test_cel_rules_on_create_skip_transition_rules_and_defaults_apply(crds):
    # 'self == oldSelf' (immutability) is an update rule; managedBy's default meets its own CEL rule
    schema = crds.version_schema(crds.load_crd("trainjobs-v2.3.0.yaml"), "trainer.kubeflow.org/v1alpha1", "TrainJob")
    obj = copy.deepcopy(manifest.build_trainjob(spec()))
    crds.apply_defaults(obj, schema)
    assert obj["spec"]["managedBy"] == "trainer.kubeflow.org/trainjob-controller"
    assert crds.cel_errors(obj, schema) == []


def test_checked_in_specs_are_accepted_by_their_crds(crds):
    # every PyTorchJob / TrainJob YAML in the repository, against the CRD of the release it names
    found = 0
    for path in sorted(REPO.glob("**/*.yaml")):
        if ".venv" in path.parts or ".git" in path.parts:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") not in ("PyTorchJob", "TrainJob"):
                continue
            found += 1
            if doc["kind"] == "PyTorchJob":
                targets = PYTORCHJOB_CRDS
            else:
                header = path.read_text().split("apiVersion:", 1)[0]
                version = next(v for v in manifest.TRAINER_VERSIONS if f"Trainer v{v} API" in header)
                targets = (TRAINJOB_CRDS[version],)
            for crd in targets:
                assert crds.check(doc, crd) == [], f"{path.relative_to(REPO)} against {crd}"
    assert found >= 2


# --- issue 23: the generator refuses what preflight and the launcher refuse ------------------------


def launcher_refusal(config_file: str, world_size: int) -> str:
    """The line the launcher prints for this layout: run_preflight's findings through enforce."""
    config = parse_job_config(["--job.config_file", config_file])
    with pytest.raises(UserError) as err:
        preflight.enforce(preflight.run_preflight(config, world_size, None, here=False), warn=lambda line: None)
    return err.value.line()


def manifest_args(config: str, nodes: int, gpus: int) -> argparse.Namespace:
    argv = ["--config", config, "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--image", "r/i:1"]
    return manifest.build_parser().parse_args([*argv, "--pvc", "my-pvc:/outputs", "--name", "x"])


@pytest.mark.parametrize(
    "nodes,gpus,check",
    [(1, 4, "parallelism"), (1, 8, "memory")],  # TP 8 on 4 GPUs; 70B on one node of 80 GB GPUs
)
def test_manifest_refuses_the_70b_layouts_the_launcher_refuses_with_its_message(nodes, gpus, check):
    config = str(REPO / "train_configs" / "llama3_70b.toml")
    with pytest.raises(UserError) as err:
        manifest.load_job_spec(manifest_args(config, nodes, gpus), repo_root=REPO)
    assert err.value.line() == launcher_refusal(config, nodes * gpus)
    assert err.value.line().startswith(f"preflight {check}:")


def test_manifest_accepts_a_layout_that_fits_and_the_cli_refuses_in_one_line(tmp_path):
    s = manifest.load_job_spec(manifest_args(str(REPO / "train_configs" / "llama3_70b.toml"), 4, 8), repo_root=REPO)
    assert s.nodes == 4
    res = run_cli(
        ["--config", "train_configs/llama3_70b.toml", "--nodes", "1", "--gpus-per-node", "4", "--image", "r/i:1"]
        + ["--pvc", "my-pvc:/outputs", "--name", "x", "--output-dir", str(tmp_path / "out")],
        REPO,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "does not divide the world size 4" in res.stderr and not (tmp_path / "out").exists()


def test_cli_trainer_version_picks_the_api(repo):
    for version, key in [("2.3", "runtimePatches"), ("2.1", "podTemplateOverrides"), ("2.0", "podSpecOverrides")]:
        res = run_cli([*CLI, "--format", "trainjob", "--trainer-version", version], repo)
        assert res.returncode == 0, res.stderr
        assert f"Kubeflow Trainer v{version} API" in res.stdout
        assert key in yaml.safe_load(res.stdout)["spec"]
