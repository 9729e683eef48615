"""The pod's launcher: map the cluster's environment onto torchrun, validate, then run it.

``run_llama_train.sh`` (the container entrypoint) execs ``python -m torchtitan_runai.launch "$@"``.
Once per pod it:

1. recognises the environment shape the cluster gave the pod (below) and turns it into torchrun
   arguments (``plan_launch``, a pure function);
2. validates the environment and the whole config (``torchtitan_runai.config``), then the inputs
   and the machine (dataset; the tokenizer, downloaded here once per node when the Hub is its
   source, and read to check it is not damaged; checkpoint folder and its owner; memory fit,
   /dev/shm: ``torchtitan_runai.preflight``) before any worker starts: a mistake is one line on
   stderr and exit code 2, never a traceback, and nothing is written; a run that is already
   complete says so and exits 0;
3. claims the checkpoint folder (node 0; its owner record and a lock that a second live run is
   refused by, with a heartbeat while the run lasts), runs torchrun's elastic agent in this process
   (rendezvous, restarts, signals to the workers) and turns its outcome into an exit code; a
   finished run ends with two lines: the steps, the time and the newest checkpoint; then what to do
   next (the export command, the loss curves, the goodput breakdown: ``next_line``). Its workers and
   their checkpoint-writing processes never outlive it, ``kill -9`` included (``lifetime``).

Usage::

    run_llama_train.sh [--dry-run | --rehearse [--exact]] [torchtitan arguments ...]
    python -m torchtitan_runai.launch [--dry-run | --rehearse [--exact]] [torchtitan arguments ...]

``--dry-run`` (first argument only) validates and prints the equivalent torchrun command as the
last line of stdout, shell-quoted, and starts nothing. Checks that depend on the machine (GPUs
present, disk space, tokenizer files, context parallel without a GPU: ``check_device_support``) are
warnings in a dry run. Arguments after the options are passed to torchtitan unchanged, e.g.
``run_llama_train.sh --training.steps 5``.

``--rehearse`` (first argument only) runs the recipe on this machine's CPUs at toy size, offline: its
own layout scaled to ``NGPU`` CPU ranks (default 4), its features where a CPU runs them, a SIGTERM, a
resume, an HF export (``torchtitan_runai.rehearsal``, its docstring is the manual; ``--exact`` also
compares the resumed losses with an uninterrupted run's).

Environment shapes (what each operator injects: docs/cluster.md), tried in this order:

==========================  =========================================================================
shape                       recognised by / mapped to
==========================  =========================================================================
elastic PyTorchJob          ``PET_RDZV_ENDPOINT`` set. ``--nnodes PET_NNODES`` (``N`` or ``min:max``),
                            rendezvous ``PET_RDZV_BACKEND`` (default c10d) at that endpoint.
Kubeflow v1.7-1.9, Run:ai   ``MASTER_ADDR`` and ``PET_NNODES``. ``--nnodes PET_NNODES``, c10d
                            rendezvous at ``MASTER_ADDR:MASTER_PORT``. ``WORLD_SIZE`` is ignored (it
                            counts processes when nprocPerNode is an integer).
Kubeflow Trainer v2         ``PET_MASTER_ADDR`` and ``PET_NNODES``, no ``MASTER_ADDR``. c10d
                            rendezvous at ``PET_MASTER_ADDR:PET_MASTER_PORT``.
old operator (<= v1.3)      ``MASTER_ADDR`` and no ``PET_*`` at all. ``--nnodes WORLD_SIZE`` (the
                            pod count there), c10d rendezvous at ``MASTER_ADDR:MASTER_PORT``; the
                            master pod's ``MASTER_ADDR=localhost`` makes it host the store.
single node                 none of the above: ``--standalone``. ``WORLD_SIZE`` or ``RANK`` here (no
                            ``MASTER_ADDR`` to meet at) is refused, unless they say one node (1, 0).
==========================  =========================================================================

A multi-node shape whose node count is 1 also runs standalone (nothing to rendezvous with).

Variables (all optional except where a shape needs them):

``CONFIG_FILE``         the TOML recipe (default ``./train_configs/llama3_8b.toml``); passed as
                        ``--job.config_file`` unless the arguments already name one. A relative path
                        is looked up where ``run_llama_train.sh`` was called first, then in the
                        repository (``config_path``).
``NGPU``                processes per node. Else a numeric ``PET_NPROC_PER_NODE``, else the number
                        of visible GPUs, else (no GPU) ``CPU_NPROC`` (default 2) for a CPU rehearsal.
``OVERRIDE_PET_NNODES`` node count to use instead of ``PET_NNODES``.
``MAX_RESTARTS``        worker-group restarts after a failure (default: ``PET_MAX_RESTARTS``, else 1).
``RDZV_TIMEOUT``        seconds to wait for all nodes at rendezvous, and for the master's DNS name
                        to resolve (default 600).
``RDZV_ID``             rendezvous id shared by all pods (default ``PET_RDZV_ID``, ``JOB_UUID``,
                        else ``torchtitan-runai``).
``LOG_RANK``            comma-separated local ranks whose output is shown (default 0), each below the
                        node's process count. ``all`` shows every rank.
``LOG_LEVEL``           ``info`` (default): the lines a person reads; ``debug``: also every line torchrun,
                        torchtitan and this fork print at start and at each checkpoint, and the
                        warnings that are expected on this path (silenced otherwise).
``LOCAL_ADDR``          address this node advertises at rendezvous (default ``POD_IP`` when set);
                        needed when the pod's hostname does not resolve from other pods.
``SHUTDOWN_TIMEOUT``    seconds the workers get to checkpoint and exit after SIGTERM before torchrun
                        kills them (default: the grace period below less 5 s, i.e. 25). Only torch
                        >= 2.13's torchrun honours it; 2.10/2.11 always kill after 30 s.
``TERMINATION_GRACE_PERIOD_SECONDS``  the pod's terminationGracePeriodSeconds (the manifest
                        generator sets it; default 30, Kubernetes'). Preflight checks that a
                        preemption checkpoint fits (``torchtitan_runai.preflight``).
``OUTPUT_DIR``          absolute path of the PVC mount: the dump folder (checkpoints, TensorBoard),
                        the Hugging Face cache (``HF_HOME``) and the Inductor cache go under it
                        (``torchtitan_runai.storage``). Unset: the config's ``job.dump_folder``.
``HF_TOKEN``            the Hub token, read from the environment by this launcher (the tokenizer
                        download) and the workers; never printed, never in argv. Or ``HF_TOKEN_PATH``:
                        a file that holds it (a mounted Secret). Surrounding whitespace is dropped;
                        a token file that cannot be read or is empty is refused before any worker.

The workers also get, unless already set: ``PYTORCH_ALLOC_CONF=expandable_segments:True`` and the
Inductor/FX-graph cache on the output volume; every variable the launcher gives them, and who wins,
is in ``torchtitan_runai.launcher.workers``.

Exit codes: 0 success or nothing left to do; 2 a user error (bad env, bad config, missing file,
a rendezvous that timed out: the line names the nodes that joined and RDZV_TIMEOUT);
128+N the launcher received signal N (143 for SIGTERM: Kubeflow's ``ExitCode`` restart policy
retries it; the workers first save a full checkpoint at the next step boundary); 142 a rank's
watchdog found the job hung (the line names the hung rank; retryable); 1 a worker failed with an
error (the line names the rank); 128+N a worker was killed by signal N (e.g. 137, OOM-killed),
also retryable.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from torchtitan_runai import goodput, hub, lifetime, storage
from torchtitan_runai.checkpoint.folder import newest_resumable, scan
from torchtitan_runai.checkpoint.ownership import claim_folder, hold_folder
from torchtitan_runai.checkpoint.resume import prestart
from torchtitan_runai.config import Hub, config_file_from_args, data_parallel_degree, warmup_note
from torchtitan_runai.errors import (
    EXIT_HUNG,
    EXIT_USER_ERROR,
    UserError,
    cli,
    describe_os_error,
    flush_and_exit,
    reported,
)
from torchtitan_runai.inputs import data_files, tokenizer_files
from torchtitan_runai.inputs.data_files import validate_data_config
from torchtitan_runai.job import parse_job_config
from torchtitan_runai.launcher import preflight, workers
from torchtitan_runai.model_lookup import check_trainable_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "train.py"
DEFAULT_CONFIG = "./train_configs/llama3_8b.toml"
EXIT_WORKER_ERROR = 1


@dataclass(frozen=True)
class LaunchPlan:
    """What torchrun is told: one instance per pod, derived from the environment alone."""

    shape: str
    """The environment shape recognised (see the module docstring)."""
    nnodes: str
    """``N`` or elastic ``min:max``."""
    nproc_per_node: int
    max_restarts: int
    standalone: bool = False
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str = ""
    rdzv_id: str = ""
    rdzv_conf: tuple[tuple[str, str], ...] = ()
    node_rank: int | None = None
    local_addr: str | None = None
    log_ranks: str = "0"
    shutdown_timeout: int = 25
    notes: tuple[str, ...] = field(default=())

    @property
    def max_nodes(self) -> int:
        return int(self.nnodes.split(":")[-1])

    @property
    def world_size(self) -> int:
        return self.max_nodes * self.nproc_per_node

    @property
    def endpoint_host(self) -> str:
        return self.rdzv_endpoint.rsplit(":", 1)[0].strip("[]") if self.rdzv_endpoint else ""


# ---------------------------------------------------------------------------------------------
# The pure mapping


def _int(env: Mapping[str, str], name: str, minimum: int = 0, default: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise UserError(name, raw, "must be an integer", f"set {name} to a whole number (or unset it)")
    if value < minimum:
        raise UserError(name, raw, f"must be at least {minimum}", f"set {name} to {minimum} or more")
    return value


def _nnodes(env: Mapping[str, str], name: str) -> str:
    raw = env.get("OVERRIDE_PET_NNODES") or env.get(name, "")
    source = "OVERRIDE_PET_NNODES" if env.get("OVERRIDE_PET_NNODES") else name
    parts = raw.strip().split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise UserError(
            source, raw, "must be a node count N or an elastic range MIN:MAX", f"set {source} to e.g. 2 or 2:2"
        )
    if len(numbers) > 2 or any(n < 1 for n in numbers) or (len(numbers) == 2 and numbers[0] > numbers[1]):
        raise UserError(source, raw, "must be N >= 1 or MIN:MAX with 1 <= MIN <= MAX", f"set {source} to e.g. 2 or 1:4")
    return ":".join(str(n) for n in numbers)


def _endpoint(env: Mapping[str, str], addr_var: str, port_var: str) -> str:
    host = env[addr_var].strip()
    if not host:
        raise UserError(addr_var, env[addr_var], "is empty", f"set {addr_var} to the master pod's hostname")
    if ":" in host and not host.startswith("["):
        raise UserError(
            addr_var, host, "must be a host name or address without a port", f"put the port in {port_var} instead"
        )
    port_raw = env.get(port_var)
    if port_raw is None or port_raw.strip() == "":
        raise UserError(
            port_var,
            port_raw,
            f"{addr_var} is set but {port_var} is not",
            f"set {port_var} (the operator's default is 23456) or unset {addr_var} for a single-node run",
        )
    port = _int(env, port_var, minimum=1)
    if port > 65535:
        raise UserError(port_var, port_raw, "is not a TCP port", "use a port in 1..65535")
    return f"{host}:{port}"


def _rdzv_endpoint(env: Mapping[str, str]) -> str:
    raw = env["PET_RDZV_ENDPOINT"].strip()
    host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise UserError("PET_RDZV_ENDPOINT", raw, "must be HOST:PORT", "set it to e.g. myjob-worker-0:29400")
    try:
        ok = 1 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise UserError("PET_RDZV_ENDPOINT", raw, "has no valid port", "set it to HOST:PORT with a port in 1..65535")
    return raw


def _rdzv_conf(env: Mapping[str, str], timeout: int) -> tuple[tuple[str, str], ...]:
    conf: dict[str, str] = {}
    raw = env.get("PET_RDZV_CONF", "").strip()
    for item in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError("PET_RDZV_CONF", raw, f"item {item!r} is not key=value", "use k=v,k2=v2")
        conf[key] = value
    conf.setdefault("join_timeout", str(timeout))
    return tuple(sorted(conf.items()))


def _nproc(env: Mapping[str, str], gpu_count: int) -> tuple[int, str]:
    ngpu = _int(env, "NGPU", minimum=1)
    if ngpu is not None:
        return ngpu, "NGPU"
    pet = env.get("PET_NPROC_PER_NODE", "").strip()
    if pet and pet != "auto":
        return _int(env, "PET_NPROC_PER_NODE", minimum=1), "PET_NPROC_PER_NODE"
    if gpu_count > 0:
        return gpu_count, "visible GPUs"
    return _int(env, "CPU_NPROC", minimum=1, default=2), "CPU rehearsal (no GPU visible)"


LONE_NODE_VARIABLES = ("WORLD_SIZE", "RANK")
"""The old operator's node count and node rank: every cluster shape that sets them also sets
``MASTER_ADDR`` (docs/cluster.md); without it they are a multi-node intent that cannot rendezvous."""


def _refuse_lone_node_variables(env: Mapping[str, str]) -> None:
    """``WORLD_SIZE`` or ``RANK`` in the single-node shape (no ``MASTER_ADDR``, no ``PET_*``).

    They only mean something beside the ``MASTER_ADDR`` they meet at: alone, torchrun would run this
    node standalone and say nothing. The values a single node agrees with (``WORLD_SIZE=1``,
    ``RANK=0``, as some platforms set on a one-node job) pass."""
    present = {name: env[name].strip() for name in LONE_NODE_VARIABLES if env.get(name, "").strip()}
    if not present or all(present.get(name, value) == value for name, value in (("WORLD_SIZE", "1"), ("RANK", "0"))):
        return
    name = "WORLD_SIZE" if "WORLD_SIZE" in present else "RANK"
    pair = "RANK" if name == "WORLD_SIZE" else "WORLD_SIZE"
    shown = ", ".join(f"{k}={v}" for k, v in present.items())
    raise UserError(
        name,
        present[name],
        f"is set ({shown}) without MASTER_ADDR, so nothing says where the nodes meet and this node would train alone",
        f"for a multi-node run set MASTER_ADDR and MASTER_PORT (the master pod) with WORLD_SIZE (the pod count) "
        f"and RANK (this pod's index), as the operator does; for a single node unset {name}"
        + (f" and {pair}" if pair in present else ""),
    )


def plan_launch(env: Mapping[str, str], gpu_count: int) -> LaunchPlan:
    """Map a pod's environment to a LaunchPlan. Pure: no I/O, raises UserError on bad values."""
    has_pet = any(k.startswith("PET_") for k in env)
    timeout = _int(env, "RDZV_TIMEOUT", minimum=1, default=600)
    nproc, nproc_source = _nproc(env, gpu_count)
    pet_restarts = _int(env, "PET_MAX_RESTARTS", minimum=0, default=1)
    max_restarts = _int(env, "MAX_RESTARTS", minimum=0, default=pet_restarts)
    rdzv_id = env.get("RDZV_ID") or env.get("PET_RDZV_ID") or env.get("JOB_UUID") or "torchtitan-runai"
    log_ranks = env.get("LOG_RANK", "0").strip() or "0"
    if log_ranks != "all" and not all(p.strip().isdigit() for p in log_ranks.split(",")):
        raise UserError("LOG_RANK", log_ranks, "must be local rank numbers like 0 or 0,1, or 'all'", "set LOG_RANK=0")
    beyond = [] if log_ranks == "all" else [p.strip() for p in log_ranks.split(",") if int(p) >= nproc]
    if beyond:
        # torchrun's filter would hide every rank it does not name: a run with no step lines at all
        raise UserError(
            "LOG_RANK",
            log_ranks,
            f"names local rank {', '.join(beyond)} but this node runs {nproc} process(es) (local ranks "
            f"0..{nproc - 1}, from {nproc_source}), so its output would never be shown",
            f"set LOG_RANK to local ranks in 0..{nproc - 1} (e.g. LOG_RANK=0), or LOG_RANK=all",
        )
    log_level = env.get("LOG_LEVEL", "info").strip().lower() or "info"
    if log_level not in ("info", "debug"):
        raise UserError("LOG_LEVEL", env.get("LOG_LEVEL"), "must be info or debug", "unset it, or set LOG_LEVEL=debug")
    common = dict(
        nproc_per_node=nproc,
        max_restarts=max_restarts,
        rdzv_id=rdzv_id,
        rdzv_conf=_rdzv_conf(env, timeout),
        local_addr=(env.get("LOCAL_ADDR") or env.get("POD_IP") or None),
        log_ranks=log_ranks,
        shutdown_timeout=_int(env, "SHUTDOWN_TIMEOUT", minimum=1, default=storage.default_shutdown_timeout(env)),
        notes=(f"processes per node from {nproc_source}",),
    )
    if env.get("PET_RDZV_ENDPOINT"):
        if not env.get("PET_NNODES") and not env.get("OVERRIDE_PET_NNODES"):
            raise UserError(
                "PET_NNODES",
                None,
                "the elastic shape (PET_RDZV_ENDPOINT) needs a node count",
                "set PET_NNODES to N or MIN:MAX",
            )
        return LaunchPlan(
            shape="elastic PyTorchJob",
            nnodes=_nnodes(env, "PET_NNODES"),
            rdzv_backend=env.get("PET_RDZV_BACKEND") or "c10d",
            rdzv_endpoint=_rdzv_endpoint(env),
            **common,
        )
    if env.get("MASTER_ADDR") is not None and has_pet:
        if not env.get("PET_NNODES") and not env.get("OVERRIDE_PET_NNODES"):
            raise UserError(
                "PET_NNODES",
                None,
                "MASTER_ADDR and PET_* are set but not the node count",
                "set PET_NNODES (the number of pods)",
            )
        plan = LaunchPlan(
            shape="Kubeflow PyTorchJob / Run:ai",
            nnodes=_nnodes(env, "PET_NNODES"),
            rdzv_endpoint=_endpoint(env, "MASTER_ADDR", "MASTER_PORT"),
            node_rank=_int(env, "PET_NODE_RANK", default=_int(env, "RANK")),
            **common,
        )
    elif env.get("PET_MASTER_ADDR") is not None:
        if not env.get("PET_NNODES") and not env.get("OVERRIDE_PET_NNODES"):
            raise UserError("PET_NNODES", None, "PET_MASTER_ADDR is set but not the node count", "set PET_NNODES")
        plan = LaunchPlan(
            shape="Kubeflow Trainer v2",
            nnodes=_nnodes(env, "PET_NNODES"),
            rdzv_endpoint=_endpoint(env, "PET_MASTER_ADDR", "PET_MASTER_PORT"),
            node_rank=_int(env, "PET_NODE_RANK"),
            **common,
        )
    elif env.get("MASTER_ADDR") is not None:
        if env.get("OVERRIDE_PET_NNODES"):
            nnodes = _nnodes(env, "OVERRIDE_PET_NNODES")
        else:
            nodes = _int(env, "WORLD_SIZE", minimum=1)
            if nodes is None:
                raise UserError(
                    "WORLD_SIZE",
                    None,
                    "MASTER_ADDR is set without PET_* or WORLD_SIZE (old operator shape)",
                    "set WORLD_SIZE to the number of pods, or OVERRIDE_PET_NNODES",
                )
            nnodes = str(nodes)
        plan = LaunchPlan(
            shape="old Kubeflow operator",
            nnodes=nnodes,
            rdzv_endpoint=_endpoint(env, "MASTER_ADDR", "MASTER_PORT"),
            node_rank=_int(env, "RANK"),
            **common,
        )
    else:
        # A node count with no address to meet at would silently train alone on this node.
        count_var = "OVERRIDE_PET_NNODES" if env.get("OVERRIDE_PET_NNODES") else "PET_NNODES"
        nnodes = _nnodes(env, count_var) if env.get(count_var) else "1"
        if nnodes.split(":")[-1] != "1":
            raise UserError(
                "MASTER_ADDR",
                None,
                f"{count_var}={env[count_var]} asks for {nnodes} nodes but no rendezvous address is set, "
                "so this node would train alone",
                "set MASTER_ADDR and MASTER_PORT to the master pod (the operator sets them; "
                "PET_RDZV_ENDPOINT for an elastic job), or set the node count to 1",
            )
        _refuse_lone_node_variables(env)
        return LaunchPlan(shape="single node", nnodes="1", standalone=True, **common)
    if plan.nnodes == "1":
        return LaunchPlan(
            **{
                **plan.__dict__,
                "standalone": True,
                "rdzv_endpoint": "",
                "node_rank": None,
                "shape": plan.shape + " (1 node: standalone)",
            }
        )
    if plan.node_rank is not None and plan.node_rank >= plan.max_nodes:
        source = next(name for name in ("PET_NODE_RANK", "RANK") if env.get(name, "").strip())
        raise UserError(
            source,
            env[source],
            f"is this pod's node rank but the job has {plan.max_nodes} node(s) (ranks 0..{plan.max_nodes - 1}); "
            "torchrun would wait for the whole rendezvous timeout and fail",
            f"set {source} to a rank below {plan.max_nodes}, or the node count to the number of pods",
        )
    return plan


def torchrun_args(
    plan: LaunchPlan, train_args: list[str], script: str | os.PathLike = TRAIN_SCRIPT, shutdown_flag: bool = True
) -> list[str]:
    """The torchrun command line (argv[0] = "torchrun") for a plan and the trainer's arguments.

    ``shutdown_flag``: whether this torchrun has ``--shutdown_timeout`` (added in 2026; older torch,
    e.g. NGC 25.12's 2.10, rejects it and waits a fixed 30 s).
    """
    args = ["torchrun", "--nnodes", plan.nnodes, "--nproc_per_node", str(plan.nproc_per_node)]
    if plan.standalone:
        args += ["--standalone"]
    else:
        args += ["--rdzv_backend", plan.rdzv_backend, "--rdzv_endpoint", plan.rdzv_endpoint, "--rdzv_id", plan.rdzv_id]
        if plan.node_rank is not None:
            args += ["--node_rank", str(plan.node_rank)]
        if plan.local_addr:
            args += ["--local_addr", plan.local_addr]
    if plan.rdzv_conf:
        args += ["--rdzv_conf", ",".join(f"{k}={v}" for k, v in plan.rdzv_conf)]
    args += ["--max_restarts", str(plan.max_restarts)]
    if shutdown_flag:
        args += ["--shutdown_timeout", str(plan.shutdown_timeout)]
    if plan.log_ranks != "all":
        args += ["--local_ranks_filter", plan.log_ranks]
    args += ["--role", "rank", "--tee", "3", str(script), *train_args]
    return args


CALLER_DIR_ENV = "TORCHTITAN_RUNAI_CALLER_DIR"
"""The directory ``run_llama_train.sh`` was called from (it changes to the repository first)."""


def config_path(path: str, env: Mapping[str, str], setting: str) -> str:
    """A relative config path as the caller meant it.

    ``run_llama_train.sh`` changes to the repository before it starts this launcher (the recipes'
    own relative paths, ``./assets/...``, are the repository's), so a relative ``CONFIG_FILE`` typed
    in another directory would be looked up in the wrong one. A relative path that exists in the
    caller's directory (``TORCHTITAN_RUNAI_CALLER_DIR``, set by the script) is made absolute there;
    one that exists only in the repository (``./train_configs/...``) stays as it is. Found in
    neither: one line naming both directories."""
    caller = env.get(CALLER_DIR_ENV, "").strip()
    if not caller or os.path.isabs(path):
        return path
    mine = Path(caller) / path
    if mine.exists():
        here = Path(path)
        return path if here.exists() and here.resolve() == mine.resolve() else str(mine)
    if not Path(path).exists():
        raise UserError(
            setting,
            path,
            f"does not exist in {caller} (where run_llama_train.sh was called) nor in {Path.cwd()} (the repository)",
            f"give the path from {caller}, an absolute path, or a recipe such as ./train_configs/llama3_8b.toml",
        )
    return path


def trainer_args(env: Mapping[str, str], user_args: list[str]) -> list[str]:
    """The trainer's arguments: CONFIG_FILE as --job.config_file unless the user passed one; either
    relative to the caller's directory where the file is there (``config_path``)."""
    given = config_file_from_args(user_args)
    if given is None:
        configured = env.get("CONFIG_FILE")
        path = config_path(configured, env, "CONFIG_FILE") if configured else DEFAULT_CONFIG
        return ["--job.config_file", path, *user_args]
    path = config_path(given, env, "--job.config_file")
    if path == given:
        return list(user_args)
    out, follows = [], False
    for arg in user_args:
        key, eq, value = arg.partition("=")
        if follows and arg == given:
            arg = path
        elif key in ("--job.config_file", "--job.config-file") and eq and value == given:
            arg = f"{key}={path}"
        follows = arg in ("--job.config_file", "--job.config-file")
        out.append(arg)
    return out


# ---------------------------------------------------------------------------------------------
# Side effects: DNS, GPUs, running the agent


def debug(line: str) -> None:
    """A launcher line shown only with LOG_LEVEL=debug (the ranks' debug lines follow the same switch)."""
    if os.environ.get("LOG_LEVEL", "").strip().lower() == "debug":
        print(line, flush=True)


def wait_for_host(host: str, timeout: float, sleep=time.sleep) -> None:
    """Kubernetes DNS for a just-created master pod lags; retry instead of crashing the job."""
    deadline = time.monotonic() + timeout
    delay = 1.0
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except socket.gaierror as e:
            if time.monotonic() + delay > deadline:
                raise UserError(
                    "rendezvous host",
                    host,
                    f"does not resolve after {timeout:.0f}s ({e.strerror})",
                    "check MASTER_ADDR / PET_RDZV_ENDPOINT and that the master pod and its Service exist; "
                    "raise RDZV_TIMEOUT if pods start slowly",
                )
            print(f"[launch] waiting for {host} to resolve ({e.strerror}); retrying in {delay:.0f}s", flush=True)
            sleep(delay)
            delay = min(delay * 2, 15.0)


def describe_failure(failures: Mapping[int, object], hang_verdict: tuple[str, float] | None = None) -> tuple[str, int]:
    """One line naming the first failing rank, and the exit code to use.

    ``hang_verdict`` (message, time) is a watchdog's finding: it wins when it was written at most
    60 s before the first failure, since the ranks it killed can reach torchrun before its own exit.
    """
    first = min(getattr(f, "timestamp", 0) for f in failures.values())
    if hang_verdict is not None and hang_verdict[1] >= first - 60:
        return f"the job hung: {hang_verdict[0]}", EXIT_HUNG
    rank = min(failures, key=lambda r: getattr(failures[r], "timestamp", 0))
    failure = failures[rank]
    code = failure.exitcode
    host = getattr(failure, "hostname", None) or socket.gethostname()
    where = f"rank {rank} (local rank {failure.local_rank} on {host})"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        hint = (
            " (the kernel's OOM killer sends SIGKILL: check the pod's memory limit)" if -code == signal.SIGKILL else ""
        )
        return f"{where} was killed by {name}{hint}", 128 - code
    if code == 2:
        return f"{where} stopped on a configuration or input error (its message is above)", 2
    if code == EXIT_HUNG:
        message = getattr(failure, "message", "") or "see the log above"
        message = message.get("message", message) if isinstance(message, dict) else message
        return f"{where} stopped the job: {message}", EXIT_HUNG
    if code >= 128:
        return f"{where} exited with code {code} (stopped by signal {code - 128})", code
    return f"{where} failed with exit code {code}; its error is in the log above", EXIT_WORKER_ERROR


def rendezvous_timeout_error(error: BaseException, plan: LaunchPlan) -> UserError:
    """A rendezvous that timed out as one line: who joined, who is missing, and RDZV_TIMEOUT.

    The other nodes that joined are read from the rendezvous handler's state in the traceback
    (torchrun keeps no other record of them; this node has already left it when the error is
    raised); without it, the line still names the counts and the fix.
    """
    others: list[str] | None = None
    tb = error.__traceback__
    while tb is not None:
        handler = tb.tb_frame.f_locals.get("self")
        state = getattr(getattr(handler, "_state_holder", None), "state", None)
        if state is not None and hasattr(state, "participants"):
            me = getattr(handler, "_this_node", None)
            others = sorted(node.addr for node in {*state.participants, *state.wait_list} if node != me)
        tb = tb.tb_next
    timeout = dict(plan.rdzv_conf).get("join_timeout", "600")
    expected = plan.nnodes.split(":")[0]
    here = "this node" if plan.node_rank is None else f"this node (node rank {plan.node_rank})"
    if others is None:
        who = f"not all {expected} nodes joined"
    elif not others:
        who = f"only 1 of {expected} node(s) joined: {here}"
        if plan.node_rank is not None:
            missing = [str(r) for r in range(plan.max_nodes) if r != plan.node_rank]
            who += f"; missing: node rank(s) {', '.join(missing)}"
    else:
        who = f"only {len(others) + 1} of {expected} node(s) joined: {here} and {', '.join(others)}"
    return UserError(
        "RDZV_TIMEOUT",
        timeout,
        f"the rendezvous at {plan.rdzv_endpoint} timed out: {who}",
        "check that every pod of the job is running (kubectl get pods) and reaches the rendezvous "
        "address, that the node count matches the number of pods, or raise RDZV_TIMEOUT if pods "
        "start slowly",
    )


def run_agent(
    torchrun_argv: list[str],
    plan: LaunchPlan | None = None,
    hang_verdict: Path | None = None,
    worker_error: Path | None = None,
) -> int:
    """Run torchrun's elastic agent in this process and translate its outcome to an exit code.

    ``hang_verdict``: the file the workers' watchdogs were told to leave a verdict in; ``worker_error``:
    the file a worker reports an error that ends the launch in (``errors.report_to_launcher``: a full
    disk during a save); both from ``workers.environment``, read when the workers stop."""
    # torchrun's agent (and torch under it): only here, when the workers start (see the
    # launcher-import test in tests/unit/launcher/test_launch.py)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_argv[1:])
    try:
        run(args)
    except SignalException as e:
        sig = signal.Signals(e.sigval)
        error = reported(worker_error) if worker_error is not None else None
        if error is not None:  # the preemption save failed: not a retryable stop
            print(
                f"[launch] received {sig.name}: workers were asked to checkpoint and stop; the checkpoint "
                "could not be saved",
                file=sys.stderr,
                flush=True,
            )
            raise error from None
        print(
            f"[launch] received {sig.name}: workers were asked to checkpoint and stop; exiting {128 + sig}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + sig
    except RendezvousTimeoutError as e:
        raise rendezvous_timeout_error(e, plan or plan_launch({}, 0)) from None
    except ChildFailedError as e:
        error = reported(worker_error) if worker_error is not None else None
        if error is not None:
            raise error from None
        found = None
        if hang_verdict is not None and hang_verdict.is_file():
            found = (hang_verdict.read_text(), hang_verdict.stat().st_mtime)
        line, code = describe_failure(e.failures, found)
        print(f"[launch] training failed: {line}", file=sys.stderr, flush=True)
        return code
    return 0


def preflight_inputs(config, env: Mapping[str, str], plan: LaunchPlan, dry_run: bool) -> str | None:
    """Data, tokenizer (``preflight.check_tokenizer``) and checkpoint folder
    (``checkpoint.resume.prestart``), before any worker starts; the inputs first, so that a missing
    one is the only line printed.

    Writes nothing into the checkpoint folder (it is claimed only once every check has passed).
    Returns a message when the run is already complete (exit 0, nothing started).
    """

    def warn(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        validate_data_config(config)
        if not dry_run:
            # Here, once per node, rather than in every rank: a Hub or file problem is the launcher's
            # one line (LOG_RANK hides most ranks' output) and costs no torchrun restart; the ranks
            # then read the folder or the cache, with no network. A dry run downloads nothing (the
            # check below reports what a real run would do).
            hub.hf_token(env)  # an unreadable or empty HF_TOKEN_PATH file: one line, download or not
            hub_section = getattr(config, "hub", None) or Hub()
            tokenizer_files.verify_tokenizer(tokenizer_files.ensure_tokenizer(config), hub_section.tokenizer_format)
    except UserError as error:
        if not dry_run:
            raise
        warn(f"[launch] warning: {error.line()}")
    if dry_run:  # the machine that trains may have it: a note about this one
        preflight.enforce([preflight.elsewhere(preflight.check_tokenizer(config, env))], warn=warn)
    return prestart(config, env, plan.world_size, data_parallel_degree(config, plan.world_size))


def apply_storage(config, train_args: list[str], env: Mapping[str, str], world_size: int):
    """OUTPUT_DIR moves the dump folder (checkpoints, TensorBoard) and the HF cache onto the PVC
    (``storage.apply_output_dir``).

    ``HF_HOME`` goes into this process's environment now, not with the workers' variables
    (``workers``): this launcher downloads the tokenizer into that cache before any worker starts,
    and the workers inherit it. A user's own ``HF_HOME`` wins.
    """
    config, train_args, paths = storage.apply_output_dir(
        config, train_args, env, lambda args: parse_job_config(args, world_size=world_size, resume=True)
    )
    for key, value in paths.env_updates().items():
        os.environ.setdefault(key, value)
    return config, train_args


def check_device_support(config, gpus: int, dry_run: bool) -> None:
    """Refuse, before any worker starts, what the ranks cannot run on the device this machine gives
    them: with no GPU visible they train on CPU with gloo (``training/device.py``). Like the other
    checks of the machine (``NGPU`` against the visible GPUs), a dry run only warns: the machine that
    trains may have GPUs.

    Context parallel: torch's ring attention shards only the CUDA attention kernels (flash, memory
    efficient, cuDNN); on CPU, SDPA dispatches ``aten._scaled_dot_product_flash_attention_for_cpu``,
    which has no DTensor sharding strategy, and step 1 dies with a traceback in every rank."""
    cp = config.parallelism.context_parallel_degree
    if gpus > 0 or cp <= 1:
        return
    error = UserError(
        "parallelism.context_parallel_degree",
        cp,
        "context parallel needs GPUs and none is visible: the ranks would train on CPU, where torch's ring "
        "attention has no kernel (it shards only CUDA attention), and step 1 would fail",
        "run on GPUs, or pass --parallelism.context_parallel_degree 1 for a CPU run",
    )
    if not dry_run:
        raise error
    print(f"[launch] warning: {error.line()}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--rehearse":  # the recipe on this machine's CPUs: launches of its own
        from torchtitan_runai import rehearsal

        return rehearsal.rehearse(trainer_args(dict(os.environ), argv[1:]), dict(os.environ))
    dry_run = bool(argv) and argv[0] == "--dry-run"
    user_args = argv[1:] if dry_run else list(argv)
    env = dict(os.environ)
    gpus = preflight.visible_gpus()
    plan = plan_launch(env, gpus)
    train_args = trainer_args(env, user_args)
    config = parse_job_config(train_args, world_size=plan.world_size, resume=True)
    check_trainable_spec(config)
    check_device_support(config, gpus, dry_run)
    note = warmup_note(config)
    if note:  # not a refusal: a short smoke run of a recipe is fair; said once, before any worker
        print(f"[launch] warning: {note}", file=sys.stderr, flush=True)
    config, train_args = apply_storage(config, train_args, env, plan.world_size)
    done = preflight_inputs(config, env, plan, dry_run)
    if done:
        print(f"[launch] {done}", flush=True)
        if not dry_run:
            if plan.node_rank in (None, 0):  # every check passed: the owner is recorded (a take-over too)
                claim_folder(storage.checkpoint_dir(config), env, take_over=config.resilience.take_over_folder)
            return 0
    ngpu = env.get("NGPU")
    if gpus and ngpu and int(ngpu) > gpus:
        message = f"NGPU={ngpu} but only {gpus} GPU(s) are visible"
        if not dry_run:
            raise UserError("NGPU", ngpu, f"only {gpus} GPU(s) are visible", f"set NGPU to at most {gpus}")
        print(f"[launch] warning: {message}", file=sys.stderr)
    gpu_memory = preflight.detect_gpu_memory_gib() if gpus else None
    preflight.enforce(
        preflight.run_preflight(
            config,
            plan.world_size,
            gpu_memory,
            dry_run=dry_run,
            env=env,
            local_ranks=plan.nproc_per_node,
            tokenizer_check=False,
            shutdown_timeout=plan.shutdown_timeout,
        )
    )
    shutdown_flag = preflight.torchrun_supports("--shutdown_timeout")
    if not shutdown_flag:  # the agent is told by its environment instead (workers.environment)
        print(
            f"[launch] note: this torchrun has no --shutdown_timeout; workers get its built-in 30 s after a "
            f"SIGTERM, not SHUTDOWN_TIMEOUT={plan.shutdown_timeout}",
            file=sys.stderr,
            flush=True,
        )
    command = torchrun_args(plan, train_args, shutdown_flag=shutdown_flag)
    where = "" if plan.standalone else f"; rendezvous {plan.rdzv_endpoint}"
    print(
        f"[launch] {plan.shape}: {plan.nnodes} node(s) x {plan.nproc_per_node} process(es){where}; "
        f"{'; '.join(plan.notes)}",
        flush=True,
    )
    if dry_run:
        print(shlex.join(command), flush=True)
        return 0
    debug(f"[launch] {shlex.join(command)}")
    if plan.endpoint_host:
        wait_for_host(plan.endpoint_host, float(dict(plan.rdzv_conf).get("join_timeout", 600)))
    started = time.monotonic()
    # Only now, with every check passed, is the folder claimed (job.json, lock.json), by node 0.
    node0 = plan.node_rank in (None, 0)
    hold = hold_folder(config, env) if node0 else None
    code = 1
    error = None
    record = None
    try:  # from here on, whatever happens, the folder's lock is released (finally)
        record = goodput.build_launch_record(config) if node0 else None  # the goodput ledger's launch
        with tempfile.TemporaryDirectory(prefix="runai-launch-") as scratch:
            verdict, worker_error = Path(scratch) / "hang-verdict", Path(scratch) / "worker-error"
            workers.export(
                workers.environment(
                    os.environ,
                    config.job.dump_folder,
                    plan.nproc_per_node,
                    shutdown_timeout=None if shutdown_flag else plan.shutdown_timeout,
                    hang_verdict=verdict,
                    worker_error=worker_error,
                    launch_id=None if record is None else record.id,
                    launcher=lifetime.launcher_mark(),  # every process of the run dies with this one
                    inputs_on_disk=data_files.on_disk(config),  # the tokenizer is on disk by now
                )
            )
            code = run_agent(command, plan, verdict, worker_error)
    except UserError as e:  # a rendezvous timeout, a worker's full disk: the last line, after the records
        error, code = e, EXIT_USER_ERROR
    except OSError as e:  # the launcher's own write (its scratch folder, the agent's files) on a full volume
        error = launch_os_error(e, config)
        if error is None:
            raise
        code = EXIT_USER_ERROR
    finally:
        if record is not None:
            record.close(code)
        if hold is not None:
            hold.release()
    if record is not None:
        print(f"[launch] {goodput.report_at_exit(config)}", flush=True)
    if error is not None:
        raise error
    if code == 0:
        print(f"[launch] {finished_line(config, time.monotonic() - started)}", flush=True)
        print(f"[launch] {next_line(config, env)}", flush=True)
    return code


def launch_os_error(error: OSError, config) -> UserError | None:
    """The launcher's own ``OSError`` while its workers run, as its last line (``errors.describe_os_error``).

    A full disk names the newest complete checkpoint and its folder: nothing saved is lost and the run
    resumes from it once there is room (the ranks' own full disk during a save comes through
    ``errors.report_to_launcher`` instead, naming the step it could not save)."""
    described = describe_os_error(error)
    if described is None or error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return described
    folder = storage.checkpoint_dir(config)
    newest = newest_resumable(scan(folder)) if config.checkpoint.enable else None
    kept = (
        f"the newest complete checkpoint, step {newest.step} in {folder}, is intact and the run resumes from it"
        if newest is not None
        else f"no checkpoint in {folder} was complete yet, so the run starts afresh"
    )
    return UserError(
        "checkpoint.folder" if config.checkpoint.enable else "job.dump_folder",
        described.value,
        f"the disk filled up during the run ({described.why}). Nothing saved was lost: {kept} once there is room",
        "free space on the volume, lower checkpoint.keep_latest_k, or grow the volume; then run the same command again",
    )


def finished_line(config, seconds: float) -> str:
    """The run's last line: what finished, the steps, the time, the newest checkpoint."""
    took = f"{int(seconds) // 3600}:{int(seconds) % 3600 // 60:02d}:{int(seconds) % 60:02d}"
    steps = config.training.steps
    if not config.checkpoint.enable:
        return f"training finished: {steps} steps in {took}; no checkpoints (checkpoint.enable = false)"
    newest = newest_resumable(scan(storage.checkpoint_dir(config)))
    where = f"newest checkpoint {newest.path}" if newest else "no complete checkpoint"
    reached = newest.step if newest else steps
    return f"training finished: step {reached} of {steps} in {took}; {where}"


def next_line(config, env: Mapping[str, str] = os.environ) -> str:
    """The run's very last line: what to do with what it made. The export command for the newest
    checkpoint (or where ``[export] at_end`` put the Hugging Face folder), the loss curves, the
    goodput breakdown. Paths as the caller can use them: relative to the repository, where
    ``run_llama_train.sh`` runs this launcher, unless it was called from elsewhere (then absolute)."""
    caller = env.get(CALLER_DIR_ENV, "").strip()

    def shown(path: str | os.PathLike) -> str:
        moved = caller and Path(caller).resolve() != Path.cwd().resolve()
        return str(Path(path).resolve()) if moved and not os.path.isabs(path) else str(path)

    parts = []
    export = getattr(config, "export", None)
    hf_folder = storage.export_dir(config) if export is not None else None
    newest = newest_resumable(scan(storage.checkpoint_dir(config))) if config.checkpoint.enable else None
    if export is not None and export.at_end and (hf_folder / "config.json").is_file():
        parts.append(f"the Hugging Face model is in {shown(hf_folder)}")
    elif newest is not None:
        dest = hf_folder if hf_folder is not None else Path(config.job.dump_folder) / "hf"
        command = ["python", "-m", "torchtitan_runai.export", shown(newest.path), shown(dest)]
        if config.job.config_file:
            command += ["--config", shown(config.job.config_file)]
        parts.append(f"export the weights for Hugging Face: {shlex.join(command)}")
    if config.metrics.enable_tensorboard:
        plot = storage.plot_file(storage.tensorboard_dir(config))
        if plot.is_file():
            parts.append(f"loss curves {shown(plot)}")
    if goodput.enabled(config):
        parts.append(
            # through Path, as the export's paths are: `./outputs/x` shows as `outputs/x` in both
            f"goodput breakdown: python -m torchtitan_runai.goodput {shlex.quote(shown(Path(config.job.dump_folder)))}"
        )
    return "next: " + ("; ".join(parts) if parts else "nothing was saved (checkpoint.enable = false)")


def leave(code: int | str | None) -> None:
    """Exit without the interpreter's teardown (``errors.flush_and_exit``): the workers are gone and
    every record is written, and unloading torch and the agent costs the pod 1-2 s after its last line
    (the goodput ledger's launch record ends just before). ``code`` is ``SystemExit``'s: a message is
    printed and exits 1."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    flush_and_exit(code or 0)


def entry() -> None:
    """``python -m torchtitan_runai.launch``: ``main`` as a command, left without interpreter teardown."""
    try:
        cli(main, prog="run_llama_train.sh")
    except SystemExit as done:
        leave(done.code)
