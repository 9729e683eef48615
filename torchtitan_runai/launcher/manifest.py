"""Cluster job specs for a training config: Run:ai command, Kubeflow PyTorchJob, Trainer v2 TrainJob.

Usage (from the repository root, where the image's ``./train_configs`` paths resolve)::

    python -m torchtitan_runai.manifest --config train_configs/llama3_8b.toml \\
        --nodes 2 --gpus-per-node 8 --image nvcr.io/<org>/torchtitan-runai:<tag> \\
        --pvc <claim>[:/outputs] --secret hf-token --name llama3-8b \\
        [--pvc-size 10Ti] [--format runai|runai-v2|pytorchjob|trainjob|all] [--output-dir deploy/llama3-8b]
        [--trainer-version 2.3|2.1|2.0] [--gpu-memory-gib 79.6]

``<claim>`` is the PVC's name as ``kubectl get pvc`` shows it (a lowercase DNS name). With
``--output-dir`` it writes ``runai.sh`` (Run:ai CLI v1), ``runai-v2.sh`` (Run:ai CLI v2:
``runai training pytorch submit``), ``pytorchjob.yaml`` and ``trainjob.yaml`` there; without, it
prints the chosen format(s) to stdout.

What every spec gets, and why:

- ``CONFIG_FILE`` (the config's path relative to the repo root, as in the image), ``NGPU`` (GPUs
  per node) and ``OUTPUT_DIR`` (= the PVC mount path: dump folder, checkpoints, TensorBoard and the
  Hugging Face cache all move with it, see ``torchtitan_runai.storage``).
- ``HF_TOKEN`` from the Kubernetes Secret ``--secret`` (key ``HF_TOKEN``), never inline: create it
  with ``kubectl create secret generic hf-token --from-file=HF_TOKEN=/dev/stdin`` (token on stdin).
  ``runai-v2.sh`` asks the installed v2 CLI: ``--env-secret HF_TOKEN=<secret>,key=HF_TOKEN`` where
  its ``--help`` lists the flag, else the Secret mounted (``--secret-volume``) with ``HF_TOKEN_PATH``
  naming the file (the job reads either: ``torchtitan_runai.hub.hf_token``).
- ``/dev/shm`` as a memory-backed emptyDir (Run:ai: ``--large-shm``); containerd's default is
  64 MiB, too small for dataloader workers and NCCL.
- The PVC mounted at ``OUTPUT_DIR``.
- ``terminationGracePeriodSeconds`` long enough for the SIGTERM checkpoint (derived from the
  recipe's checkpoint size, ``--grace-period`` overrides), and the same number as
  ``TERMINATION_GRACE_PERIOD_SECONDS`` for the launcher's grace budget (``storage.grace_period``).
- PyTorchJob ``restartPolicy: ExitCode``: the launcher exits 143 when preempted and 128+ on signals
  (retryable: the pod is restarted and resumes from the newest checkpoint) and 1-127 on errors
  (user error 2, crash 1: permanent, the job fails instead of looping); ``runPolicy.backoffLimit``
  bounds the retries.
- The container keeps the image's entrypoint (tini → run_llama_train.sh): PyTorchJob and Run:ai
  set no command; the TrainJob must set one (its runtime's template has its own) and names the
  same chain.

Before it writes anything it refuses what the launcher and preflight would refuse, with their
message (``check_layout``): a config the job cannot parse, parallel degrees that do not tile nodes x
GPUs per node, a memory estimate that does not fit the GPU (``--gpu-memory-gib``, default an H100
80GB).

Versions (each checked against that release's CRD by ``tests/unit/launcher/test_manifest.py``):
PyTorchJob ``kubeflow.org/v1`` for training-operator v1.8/v1.9 (``spec.nprocPerNode``, a string);
TrainJob ``trainer.kubeflow.org/v1alpha1`` on the ``torch-distributed`` ClusterTrainingRuntime for
Kubeflow Trainer v2.3 by default (``spec.runtimePatches``, which also sets the pods'
``terminationGracePeriodSeconds``; ``numProcPerNode`` an integer), ``--trainer-version 2.1``
(``podTemplateOverrides``) or ``2.0`` (``podSpecOverrides``); those two cannot set the grace
period: it comes from the runtime (the file's header says what to set there).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from torchtitan_runai import errors, storage
from torchtitan_runai.errors import UserError
from torchtitan_runai.job import parse_job_config
from torchtitan_runai.launcher import preflight

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

APP_DIR = "/workspace/torchtitan-runai"
"""The image's WORKDIR (Dockerfile): CONFIG_FILE paths are relative to it."""

ENTRYPOINT = ["/usr/bin/tini", "-s", "--", "/opt/nvidia/nvidia_entrypoint.sh", f"{APP_DIR}/run_llama_train.sh"]
"""The image's ENTRYPOINT, spelled out where a spec must set a command (TrainJob)."""

PYTORCHJOB_PORT = 23456
"""training-operator's default master port (container port named ``pytorchjob-port``)."""

TRAINJOB_PORT = 29500
"""Kubeflow Trainer v2 torch plugin's PET_MASTER_PORT."""

CONTAINER_UID = 1000
"""The image's numeric USER; any UID works (world-writable HOME/caches), this one is the default."""

HF_TOKEN_KEY = "HF_TOKEN"
FORMATS = ("runai", "pytorchjob", "trainjob")
"""What operator_env knows: the pods' environment as each operator creates it."""
OUTPUTS = ("runai", "runai-v2", "pytorchjob", "trainjob")
"""What the CLI emits (runai-v2: the same Run:ai job through the v2 CLI)."""
TRAINER_VERSIONS = ("2.3", "2.1", "2.0")
"""Kubeflow Trainer releases a TrainJob is generated for (``--trainer-version``); the first is the default."""

TRAINER_DEFAULT = TRAINER_VERSIONS[0]

RUNTIME_PATCH_MANAGER = "torchtitan-runai.manifest"
"""``spec.runtimePatches[].manager`` (Trainer 2.2+): who owns the patch entry (Kueue and the Trainer's
webhooks add entries of their own, each keyed by its manager)."""
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 40
"""Pod names are ``<name>-worker-<i>`` / ``<name>-node-0-<i>`` and must stay within 63 chars."""


@dataclass(frozen=True)
class JobSpec:
    """Everything the three spec builders need; built from the CLI and the config by load_job_spec."""

    name: str
    """Job name (RFC 1035 label); pods and the master's DNS name derive from it."""

    config_file: str
    """CONFIG_FILE as the pod sees it: ``./train_configs/...`` relative to the image WORKDIR."""

    nodes: int
    """Pods (one per node); Run:ai/PyTorchJob: 1 master + nodes-1 workers."""

    gpus_per_node: int
    """GPUs requested per pod and processes per node (NGPU, nprocPerNode)."""

    image: str
    """Training image built from this repo's Dockerfile."""

    pvc_claim: str
    """Existing PersistentVolumeClaim holding the run's outputs (ReadWriteMany for nodes > 1)."""

    mount_path: str = storage.IMAGE_OUTPUT_DIR
    """Where the PVC is mounted; also OUTPUT_DIR."""

    secret: str = "hf-token"
    """Kubernetes Secret with the Hugging Face token under key HF_TOKEN."""

    grace_seconds: int = 300
    """Pod terminationGracePeriodSeconds: time for the SIGTERM checkpoint."""

    backoff_limit: int = 5
    """PyTorchJob runPolicy.backoffLimit: retryable (128+) restarts before the job fails."""

    shm_size: str = "64Gi"
    """sizeLimit of the memory-backed /dev/shm (counts against the pod's memory)."""

    project: str | None = None
    """Run:ai project (``-p``); None uses the CLI's default project."""

    trainer_version: str = TRAINER_DEFAULT
    """The Kubeflow Trainer release the TrainJob is written for (``TRAINER_VERSIONS``)."""

    extra_env: tuple[tuple[str, str], ...] = field(default=())
    """More plain environment variables for every pod (never secrets)."""

    def env(self) -> list[tuple[str, str]]:
        """Plain (non-secret) container environment, in a stable order."""
        return [
            ("CONFIG_FILE", self.config_file),
            ("NGPU", str(self.gpus_per_node)),
            (storage.OUTPUT_DIR_ENV, self.mount_path),
            *self.extra_env,
        ]


# ---------------------------------------------------------------------------------------------
# Builders (pure)
# ---------------------------------------------------------------------------------------------


def _k8s_env(spec: JobSpec) -> list[dict[str, Any]]:
    plain = [{"name": k, "value": v} for k, v in spec.env()]
    secret = {
        "name": HF_TOKEN_KEY,
        "valueFrom": {"secretKeyRef": {"name": spec.secret, "key": HF_TOKEN_KEY}},
    }
    return plain + [secret]


def _volumes(spec: JobSpec) -> list[dict[str, Any]]:
    return [
        {"name": "outputs", "persistentVolumeClaim": {"claimName": spec.pvc_claim}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
    ]


def _volume_mounts(spec: JobSpec) -> list[dict[str, Any]]:
    return [
        {"name": "outputs", "mountPath": spec.mount_path},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]


def _labels(spec: JobSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "torchtitan-runai", "app.kubernetes.io/instance": spec.name}


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": CONTAINER_UID,
        "fsGroup": CONTAINER_UID,
        # chown the PVC once, not on every pod start (a full PVC has millions of files)
        "fsGroupChangePolicy": "OnRootMismatch",
    }


def build_pod_template(spec: JobSpec, master: bool) -> dict[str, Any]:
    """The PodTemplateSpec of a PyTorchJob replica (a core v1 object: validated as such)."""
    container: dict[str, Any] = {
        "name": "pytorch",  # the training operator injects its env only into this container
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        # the grace period this spec sets, so the launcher and preflight budget the SIGTERM checkpoint
        "env": [*_k8s_env(spec), {"name": storage.GRACE_PERIOD_ENV, "value": str(spec.grace_seconds)}],
        "resources": {
            "limits": {"nvidia.com/gpu": spec.gpus_per_node},
            "requests": {"nvidia.com/gpu": spec.gpus_per_node},
        },
        "volumeMounts": _volume_mounts(spec),
    }
    if master:
        container["ports"] = [{"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT}]
    return {
        "metadata": {"labels": _labels(spec)},
        "spec": {
            "terminationGracePeriodSeconds": spec.grace_seconds,
            "securityContext": _pod_security_context(),
            "containers": [container],
            "volumes": _volumes(spec),
        },
    }


def build_pytorchjob(spec: JobSpec) -> dict[str, Any]:
    """Kubeflow training-operator v1.8+ PyTorchJob: 1 Master + (nodes-1) Workers."""
    replica = lambda master, n: {  # noqa: E731
        "replicas": n,
        "restartPolicy": "ExitCode",
        "template": build_pod_template(spec, master),
    }
    replicas = {"Master": replica(True, 1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(False, spec.nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": spec.name, "labels": _labels(spec)},
        "spec": {
            "nprocPerNode": str(spec.gpus_per_node),
            "runPolicy": {"backoffLimit": spec.backoff_limit},
            "pytorchReplicaSpecs": replicas,
        },
    }


def build_trainjob(spec: JobSpec, trainer_version: str | None = None) -> dict[str, Any]:
    """Kubeflow Trainer TrainJob on the ``torch-distributed`` runtime, in the API of ``trainer_version``:

    - 2.3 (default): the pod settings go in ``spec.runtimePatches`` (one entry, our
      manager's), which also sets the pods' ``terminationGracePeriodSeconds`` (the grace budget) and
      their security context; ``TERMINATION_GRACE_PERIOD_SECONDS`` tells the launcher and preflight;
    - 2.1: ``spec.podTemplateOverrides`` (volumes and mounts; no grace period: the runtime's);
    - 2.0: ``spec.podSpecOverrides`` (the same, one level flatter).

    ``trainer_version`` defaults to the spec's (``--trainer-version``).
    """
    trainer_version = trainer_version or spec.trainer_version
    if trainer_version not in TRAINER_VERSIONS:
        raise UserError(
            "--trainer-version",
            trainer_version,
            "is not a Trainer release this generator knows",
            f"pass one of {', '.join(TRAINER_VERSIONS)}",
        )
    env = _k8s_env(spec)
    if trainer_version == "2.3":
        env.append({"name": storage.GRACE_PERIOD_ENV, "value": str(spec.grace_seconds)})
    node_container = {"name": "node", "volumeMounts": _volume_mounts(spec)}
    job_spec: dict[str, Any] = {
        "runtimeRef": {"name": "torch-distributed"},
        "trainer": {
            "image": spec.image,
            # the runtime's template has its own command; ours is the image's entrypoint
            "command": list(ENTRYPOINT),
            "numNodes": spec.nodes,
            "numProcPerNode": spec.gpus_per_node,  # int32 from 2.2; int-or-string before
            "resourcesPerNode": {
                "limits": {"nvidia.com/gpu": spec.gpus_per_node},
                "requests": {"nvidia.com/gpu": spec.gpus_per_node},
            },
            "env": env,
        },
    }
    if trainer_version == "2.3":
        pod_spec = {
            "terminationGracePeriodSeconds": spec.grace_seconds,
            "securityContext": _pod_security_context(),
            "volumes": _volumes(spec),
            "containers": [node_container],
        }
        job_spec["runtimePatches"] = [
            {
                "manager": RUNTIME_PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": pod_spec}}}}]
                        }
                    }
                },
            }
        ]
    elif trainer_version == "2.1":
        job_spec["podTemplateOverrides"] = [
            {"targetJobs": [{"name": "node"}], "spec": {"volumes": _volumes(spec), "containers": [node_container]}}
        ]
    else:
        job_spec["podSpecOverrides"] = [
            {"targetJobs": [{"name": "node"}], "volumes": _volumes(spec), "containers": [node_container]}
        ]
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": spec.name, "labels": _labels(spec)},
        "spec": job_spec,
    }


def _runai_pod_flags(spec: JobSpec) -> list[str]:
    """The flags both Run:ai CLI syntaxes spell alike: project, GPUs, image, shared memory, volume, env."""
    flags = ["-p", spec.project] if spec.project else []
    flags += ["-g", str(spec.gpus_per_node), "-i", spec.image, "--large-shm"]
    flags += ["--existing-pvc", f"claimname={spec.pvc_claim},path={spec.mount_path}"]
    for key, value in spec.env():
        flags += ["-e", f"{key}={value}"]
    return flags


def build_runai_command(spec: JobSpec) -> list[str]:
    """argv of the Run:ai CLI (v1 syntax, as in the original example project): ``submit-dist pytorch`` for several
    nodes, plain ``submit`` for one. HF_TOKEN comes from the Secret (``-e VAR=SECRET:name,key``)."""
    argv = ["runai"]
    if spec.nodes > 1:
        argv += ["submit-dist", "pytorch", "--name", spec.name, f"--workers={spec.nodes - 1}"]
    else:
        argv += ["submit", "--name", spec.name]
    argv += _runai_pod_flags(spec)
    argv += ["-e", f"{HF_TOKEN_KEY}=SECRET:{spec.secret},{HF_TOKEN_KEY}"]
    return argv


SECRET_MOUNT = "/var/run/secrets/hf-token"
"""Where the v2 command mounts the token's Secret; the job reads HF_TOKEN_PATH=<this>/HF_TOKEN."""


TOKEN_MODES = ("env-secret", "secret-volume")
"""How the v2 command hands the job its token: ``--env-secret HF_TOKEN=<secret>,key=HF_TOKEN`` (the
variable filled from the Secret, where the CLI has the flag) or ``--secret-volume`` plus
``HF_TOKEN_PATH`` (the Secret mounted as a file, what every v2 CLI has)."""

TOKEN_ARRAY = '"${token[@]}"'
"""In ``runai-v2.sh``: the token flags the script chose after asking the installed CLI."""


def runai_v2_token_flags(spec: JobSpec, mode: str) -> list[str]:
    """The token's flags of the v2 command in ``mode`` (``TOKEN_MODES``)."""
    if mode == "env-secret":
        return ["--env-secret", f"{HF_TOKEN_KEY}={spec.secret},key={HF_TOKEN_KEY}"]
    return [
        "--secret-volume",
        f"path={SECRET_MOUNT},name={spec.secret}",
        "-e",
        f"HF_TOKEN_PATH={SECRET_MOUNT}/{HF_TOKEN_KEY}",
    ]


def build_runai_v2_command(spec: JobSpec, token: str = "env-secret") -> list[str]:
    """argv of the Run:ai v2 CLI: ``runai training pytorch submit NAME`` (a master pod plus
    ``--workers`` = nodes-1, each with the GPUs) for several nodes, ``runai training standard submit``
    for one. Flags as documented for that CLI (docs/cluster.md cites the reference): the grace period
    (``--termination-grace-period``, also passed as ``TERMINATION_GRACE_PERIOD_SECONDS`` for the
    launcher's grace budget) and retries (``--backoff-limit``) are set here. The token: ``token``
    (``TOKEN_MODES``): newer v2 CLIs fill ``HF_TOKEN`` from the Secret with ``--env-secret
    ENV=SECRET,key=KEY``; older ones have only ``--secret-volume``, so the Secret is mounted and
    ``HF_TOKEN_PATH`` names the file (read by the job, whitespace stripped). ``runai-v2.sh`` asks the
    installed CLI's ``--help`` which one it has (``render_runai_v2``)."""
    return _runai_v2_argv(spec, runai_v2_token_flags(spec, token))


def _runai_v2_argv(spec: JobSpec, token_flags: list[str]) -> list[str]:
    argv = ["runai", "training"]
    if spec.nodes > 1:
        argv += [
            "pytorch",
            "submit",
            spec.name,
            "--workers",
            str(spec.nodes - 1),
            "--master-gpu-devices-request",
            str(spec.gpus_per_node),
        ]
    else:
        argv += ["standard", "submit", spec.name]
    argv += _runai_pod_flags(spec)
    argv += ["-e", f"{storage.GRACE_PERIOD_ENV}={spec.grace_seconds}"]
    argv += token_flags
    argv += ["--termination-grace-period", f"{spec.grace_seconds}s", "--backoff-limit", str(spec.backoff_limit)]
    return argv


def render_runai(spec: JobSpec, argv: list[str] | None = None) -> str:
    """The Run:ai command as a copy-pastable multi-line shell command."""
    lines: list[list[str]] = [[]]
    for token in argv or build_runai_command(spec):
        if token.startswith("-") or token == TOKEN_ARRAY:
            lines.append([])  # one option (and its value) per line
        lines[-1].append(token)
    quote = lambda token: token if token == TOKEN_ARRAY else shlex.quote(token)  # noqa: E731
    return " \\\n    ".join(" ".join(map(quote, line)) for line in lines) + "\n"


def render_runai_v2(spec: JobSpec) -> str:
    """The v2 command as a script that picks the token's flags from the installed CLI's ``--help``
    (``--env-secret`` where it is listed, else the mounted Secret) and then submits."""
    argv = _runai_v2_argv(spec, [TOKEN_ARRAY])
    subcommand = shlex.join(argv[:4])
    choose = (
        "# HF_TOKEN from the Secret: --env-secret where this CLI has it (newer v2 CLIs), else the Secret\n"
        "# mounted as a file that HF_TOKEN_PATH names (every v2 CLI; the job reads either).\n"
        f"help=$({subcommand} --help 2>/dev/null || true)\n"
        "if [[ $help == *--env-secret* ]]; then\n"
        f"    token=({shlex.join(runai_v2_token_flags(spec, 'env-secret'))})\n"
        "else\n"
        f"    token=({shlex.join(runai_v2_token_flags(spec, 'secret-volume'))})\n"
        "fi\n"
    )
    return choose + render_runai(spec, argv)


# ---------------------------------------------------------------------------------------------
# Config → JobSpec (the TOML for the paths and sizes; the layout checks parse it as the job will)
# ---------------------------------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError("--config", str(path), "does not exist", "pass a file under train_configs/") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError("--config", str(path), f"is not valid TOML ({e})", "fix the TOML syntax") from None


def config_in_image(path: Path, repo_root: Path) -> str:
    """The config's path as the pod sees it (``./<relative to the repo root>``)."""
    try:
        rel = path.resolve().relative_to(repo_root.resolve())
    except ValueError:
        raise UserError(
            "--config",
            str(path),
            f"is outside the repository ({repo_root}), so it is not in the image",
            "put it under train_configs/, rebuild the image, and run this command from the repo root",
        ) from None
    return "./" + rel.as_posix()


_CLAIM_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
"""A PersistentVolumeClaim name: a lowercase DNS subdomain name (RFC 1123), at most 253 characters."""


def parse_pvc(text: str) -> tuple[str, str]:
    claim, _, mount = text.partition(":")
    mount = mount or storage.IMAGE_OUTPUT_DIR
    if not claim or not _CLAIM_RE.match(claim) or len(claim) > 253:
        raise UserError(
            "--pvc",
            text,
            f"{claim!r} is not a claim name: claim names are lowercase DNS names (a-z, 0-9, '-' "
            "and '.', starting and ending with a letter or digit)",
            f"pass the name `kubectl get pvc` shows, e.g. --pvc llama3-outputs:{mount}",
        )
    if not os.path.isabs(mount) or mount.rstrip("/") in ("", "/dev", "/proc", "/sys") or mount.startswith("/dev/"):
        raise UserError("--pvc", text, "mount path must be an absolute, ordinary folder", "e.g. --pvc CLAIM:/outputs")
    return claim, os.path.normpath(mount)


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or len(name) > MAX_NAME:
        raise UserError(
            "--name",
            name,
            f"must be a lowercase RFC 1035 label of at most {MAX_NAME} characters (pod names derive from it)",
            "use letters, digits and '-', starting with a letter, e.g. llama3-8b",
        )
    return name


def load_job_spec(args: argparse.Namespace, repo_root: Path | None = None) -> JobSpec:
    """Validate the CLI and the config; derive the grace period and check retention vs the PVC."""
    repo_root = Path.cwd() if repo_root is None else repo_root
    config_path = Path(args.config)
    config = read_config(config_path)
    if args.nodes < 1:
        raise UserError("--nodes", args.nodes, "must be at least 1", "pass the number of pods/nodes")
    if args.gpus_per_node < 1:
        raise UserError("--gpus-per-node", args.gpus_per_node, "must be at least 1", "e.g. 8 for an H100 node")
    if not args.image or any(c.isspace() for c in args.image):
        raise UserError("--image", args.image, "is not an image reference", "e.g. nvcr.io/<org>/torchtitan-runai:0.1")
    claim, mount = parse_pvc(args.pvc)
    job, ckpt, metrics = (config.get(k, {}) for k in ("job", "checkpoint", "metrics"))
    # the same policy the launcher applies: raises if a folder would leave the PVC
    storage.resolve_storage(
        {storage.OUTPUT_DIR_ENV: mount},
        dump_folder=job.get("dump_folder", "./outputs"),
        checkpoint_folder=ckpt.get("folder", "checkpoint"),
        tb_folder=metrics.get("save_tb_folder", "tb"),
    )
    flavor = str(config.get("model", {}).get("flavor", ""))
    one_ckpt = storage.checkpoint_bytes(flavor) if flavor in storage.PARAMS_BY_FLAVOR else None
    if args.pvc_size and one_ckpt and ckpt.get("enable", False):
        storage.check_keep_latest_k(int(ckpt.get("keep_latest_k", 10)), storage.parse_size(args.pvc_size), one_ckpt)
    grace = args.grace_period
    if grace is None:
        grace = storage.recommended_grace_seconds(one_ckpt, args.nodes) if one_ckpt else 300
    if grace < 30:
        raise UserError("--grace-period", grace, "leaves no time for the SIGTERM checkpoint", "use 120 or more")
    job_spec = JobSpec(
        name=check_name(args.name),
        config_file=config_in_image(config_path, repo_root),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        image=args.image,
        pvc_claim=claim,
        mount_path=mount,
        secret=check_name_secret(args.secret),
        grace_seconds=grace,
        backoff_limit=args.backoff_limit,
        shm_size=args.shm_size,
        project=args.project,
        trainer_version=args.trainer_version,
    )
    # last: the settings above are cheap to check; this one parses the config as the job will
    check_layout(config_path, args.nodes, args.gpus_per_node, args.gpu_memory_gib)
    return job_spec


def check_layout(config_path: Path, nodes: int, gpus_per_node: int, gpu_memory_gib: float | None) -> None:
    """Refuse what the launcher and preflight refuse, with their message: the config as the job parses
    it (``job.parse_job_config``), its parallel degrees against nodes x GPUs per node and its memory
    estimate against the GPU (``preflight.check_layout``; ``gpu_memory_gib`` None: an H100 80GB).
    A memory estimate within the estimator's tolerance is a warning on stderr, as in the launcher."""
    config = parse_job_config(["--job.config_file", str(config_path)])
    findings, _ = preflight.check_layout(config, nodes * gpus_per_node, gpu_memory_gib)
    preflight.enforce(findings, warn=lambda line: print(line, file=sys.stderr, flush=True))


def check_name_secret(name: str) -> str:
    if not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", name or ""):
        raise UserError("--secret", name, "is not a Secret name", "e.g. --secret hf-token")
    return name


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _yaml(obj: dict[str, Any], header: str) -> str:
    return header + yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=100)


def render(spec: JobSpec, fmt: str, command_line: str) -> str:
    header = f"# Generated by: {command_line}\n# Do not put secrets here: HF_TOKEN comes from Secret '{spec.secret}'.\n"
    if fmt == "runai":
        return "#!/usr/bin/env bash\n" + header + "set -euo pipefail\n" + render_runai(spec)
    if fmt == "runai-v2":
        return (
            "#!/usr/bin/env bash\n"
            + header
            + "# Run:ai v2 CLI (runai training ... submit); runai.sh is the v1 form.\n"
            + "set -euo pipefail\n"
            + render_runai_v2(spec)
        )
    if fmt == "pytorchjob":
        return _yaml(build_pytorchjob(spec), header)
    return _yaml(build_trainjob(spec), header + trainjob_notes(spec))


def trainjob_notes(spec: JobSpec) -> str:
    """The TrainJob's header: which Trainer API it is written in, and where its grace period comes from."""
    if spec.trainer_version == "2.3":
        return (
            "# Kubeflow Trainer v2.3 API (spec.runtimePatches with the pods' terminationGracePeriodSeconds).\n"
            "# Older Trainers: --trainer-version 2.1 (podTemplateOverrides) or 2.0 (podSpecOverrides).\n"
        )
    key = "podTemplateOverrides" if spec.trainer_version == "2.1" else "podSpecOverrides"
    return (
        f"# Kubeflow Trainer v{spec.trainer_version} API ({key}). The pod's terminationGracePeriodSeconds comes\n"
        f"# from the runtime, not the TrainJob: set it to {spec.grace_seconds} in the runtime's pod template.\n"
    )


FILENAMES = {
    "runai": "runai.sh",
    "runai-v2": "runai-v2.sh",
    "pytorchjob": "pytorchjob.yaml",
    "trainjob": "trainjob.yaml",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchtitan_runai.manifest",
        description="Emit the Run:ai command, a Kubeflow PyTorchJob and a Trainer v2 TrainJob for a config.",
    )
    p.add_argument(
        "--config", required=True, help="train config TOML under the repo (e.g. train_configs/llama3_8b.toml)"
    )
    p.add_argument("--nodes", type=int, required=True, help="number of nodes (pods)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--image", required=True, help="training image built from this repo's Dockerfile")
    p.add_argument(
        "--pvc",
        required=True,
        metavar="CLAIM[:MOUNT]",
        help="existing PVC (its lowercase name, as kubectl get pvc shows it) and its mount path = "
        "OUTPUT_DIR (default /outputs), e.g. llama3-outputs:/outputs",
    )
    p.add_argument("--name", default="torchtitan", help="job name (default torchtitan)")
    p.add_argument("--secret", default="hf-token", help="Kubernetes Secret holding HF_TOKEN under key HF_TOKEN")
    p.add_argument("--format", choices=(*OUTPUTS, "all"), default="all")
    p.add_argument(
        "--output-dir", help="write runai.sh / runai-v2.sh / pytorchjob.yaml / trainjob.yaml here instead of stdout"
    )
    p.add_argument("--pvc-size", help="PVC capacity (e.g. 10Ti): checks checkpoint.keep_latest_k fits")
    p.add_argument("--grace-period", type=int, help="terminationGracePeriodSeconds (default: from the checkpoint size)")
    p.add_argument("--backoff-limit", type=int, default=5, help="PyTorchJob retries on retryable exits (default 5)")
    p.add_argument("--shm-size", default="64Gi", help="memory-backed /dev/shm size limit (default 64Gi)")
    p.add_argument("--project", help="Run:ai project (-p)")
    p.add_argument(
        "--trainer-version",
        choices=TRAINER_VERSIONS,
        default=TRAINER_DEFAULT,
        help=f"Kubeflow Trainer release of the TrainJob (default {TRAINER_DEFAULT}: runtimePatches; "
        "2.1: podTemplateOverrides; 2.0: podSpecOverrides)",
    )
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="the nodes' GPU memory for the fit check (default 79.6: an H100 80GB), as preflight takes it",
    )
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    spec = load_job_spec(args)
    command_line = "python -m torchtitan_runai.manifest " + shlex.join(argv)
    formats = OUTPUTS if args.format == "all" else (args.format,)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for fmt in formats:
            path = out / FILENAMES[fmt]
            with errors.writing(path):
                path.write_text(render(spec, fmt, command_line))
                if fmt.startswith("runai"):
                    path.chmod(0o755)
            print(path)
        return 0
    print("\n".join(render(spec, fmt, command_line) for fmt in formats), end="")
    return 0


def entry() -> None:
    errors.cli(main, "torchtitan_runai.manifest")
