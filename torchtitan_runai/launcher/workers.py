"""The workers' environment: every variable the launcher gives torchrun's agent and the workers it starts.

torchrun's agent runs in the launcher's process and starts the workers with the launcher's
environment (``os.environ`` at that moment). ``environment`` computes what the launcher adds to it,
and ``export`` puts it there, once, just before the agent starts (``launch.main``):

==================================  ===================================================================  ============
variable                            value                                                                who wins
==================================  ===================================================================  ============
``TORCHINDUCTOR_CACHE_DIR``         ``<dump folder>/.cache/inductor`` (``storage.inductor_cache_dir``):  the user
                                    a restarted pod reuses the compiled kernels
``TORCHINDUCTOR_FX_GRAPH_CACHE``    ``1``                                                                the user
``TORCHINDUCTOR_AUTOGRAD_CACHE``    ``1``                                                                the user
``PYTORCH_ALLOC_CONF``              ``expandable_segments:True``; not set when the user set the older    the user
                                    ``PYTORCH_CUDA_ALLOC_CONF``
``OMP_NUM_THREADS``                 ``1`` with more than one process per node (what torchrun would set;  the user
                                    set here, torchrun does not print its banner about it)
``HF_UPDATE_DOWNLOAD_COUNTS``       ``0``: ``datasets`` otherwise sends a HEAD request to                the user
                                    s3.amazonaws.com (a download counter) at every ``load_dataset`` of
                                    local json/parquet/text files, on every rank
``HF_HUB_DISABLE_TELEMETRY``        ``1``: no usage reports from the Hub client                          the user
``HF_HUB_OFFLINE``                  ``1`` when every dataset the ranks read is on disk                   the user
                                    (``inputs.data_files.on_disk``): the ranks then need no network at
                                    all (the tokenizer is on disk too: the launcher fetched it before
                                    any worker), and a library that still tries fails at once
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``  ``SHUTDOWN_TIMEOUT``, only for a torchrun without                    the launcher
                                    ``--shutdown_timeout``: read by the agent itself when it starts
``TORCHTITAN_RUNAI_HANG_VERDICT``   the file a rank's hang watchdog leaves its verdict in                the launcher
                                    (``errors.HANG_VERDICT_ENV``)
``TORCHTITAN_RUNAI_WORKER_ERROR``  the file a worker reports an error that ends the launch in (a full  the launcher
                                    disk during a save: ``errors.report_to_launcher``,
                                    ``errors.WORKER_ERROR_ENV``)
``TORCHTITAN_RUNAI_LAUNCH_ID``      node 0's goodput launch record, which rank 0's segments belong       the launcher
                                    to (``goodput.ledger.LAUNCH_ID_ENV``)
``TORCHTITAN_RUNAI_LAUNCHER``       this launcher's pid and start time (``lifetime.LAUNCHER_ENV``): a    the launcher
                                    worker dies with it (the parent-death signal, checked against this
                                    pid), and a rerun finds what is left of the run by it
==================================  ===================================================================  ============

"The user" wins: a variable already in the environment is left as it is. The workers also inherit
``HF_HOME``, the Hub cache on the output volume, which is not here: the launcher downloads the
tokenizer into it before any worker exists, so it goes into the launcher's own environment as soon
as the storage is resolved (``launch.apply_storage``, ``storage.StoragePaths.env_updates``).
"""

from __future__ import annotations

import os
from typing import Mapping

from torchtitan_runai import storage
from torchtitan_runai.errors import HANG_VERDICT_ENV, WORKER_ERROR_ENV
from torchtitan_runai.goodput.ledger import LAUNCH_ID_ENV
from torchtitan_runai.lifetime import LAUNCHER_ENV


def worker_env(output_dir: str | os.PathLike, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The workers' defaults that follow the output volume (never overriding the user's).

    - ``TORCHINDUCTOR_CACHE_DIR`` on the output volume: a restarted pod reuses compiled kernels
      (Inductor's FX-graph cache, AOTAutograd cache and Triton binaries all live under it; ~12 s
      sooner to the first step, bench/results/startup-*).
    - FX-graph and AOTAutograd caches switched on explicitly (defaults differ across torch builds).
    - ``PYTORCH_ALLOC_CONF=expandable_segments:True``: what torchtitan's own run_train.sh sets; it is
      what lets the big-batch recipes fit (docs/performance.md).
    """
    env = dict(env or {})
    wanted = {
        "TORCHINDUCTOR_CACHE_DIR": str(storage.inductor_cache_dir(output_dir)),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
        "PYTORCH_ALLOC_CONF": "expandable_segments:True",
    }
    return {
        k: v
        for k, v in wanted.items()
        if k not in env and not (k == "PYTORCH_ALLOC_CONF" and "PYTORCH_CUDA_ALLOC_CONF" in env)
    }


def environment(
    env: Mapping[str, str],
    dump_folder: str | os.PathLike,
    nproc_per_node: int,
    *,
    shutdown_timeout: int | None = None,
    hang_verdict: str | os.PathLike | None = None,
    worker_error: str | os.PathLike | None = None,
    launch_id: str | None = None,
    launcher: str | None = None,
    inputs_on_disk: bool = False,
) -> dict[str, str]:
    """Every variable the launcher adds to ``env`` (the environment the agent will start the workers
    with) for its workers: the table in the module docstring.

    ``shutdown_timeout``: only for a torchrun without ``--shutdown_timeout`` (the variable is how an
    older agent is told); ``hang_verdict``: the watchdog's verdict file; ``worker_error``: the file a
    worker's launch-ending error goes to (``errors.report_to_launcher``); ``launch_id``: node 0's
    goodput launch record; ``launcher``: this launcher's ``lifetime.launcher_mark``. Each is left out
    when None. ``inputs_on_disk``: the data and the tokenizer are files (``inputs.data_files.on_disk``),
    so the workers are told to stay offline.
    """
    variables = worker_env(dump_folder, env)
    if nproc_per_node > 1 and "OMP_NUM_THREADS" not in env:
        variables["OMP_NUM_THREADS"] = "1"
    quiet = {"HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if inputs_on_disk:
        quiet["HF_HUB_OFFLINE"] = "1"
    variables.update({k: v for k, v in quiet.items() if k not in env})
    if shutdown_timeout is not None:
        variables["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(shutdown_timeout)
    if hang_verdict is not None:
        variables[HANG_VERDICT_ENV] = str(hang_verdict)
    if worker_error is not None:
        variables[WORKER_ERROR_ENV] = str(worker_error)
    if launch_id is not None:
        variables[LAUNCH_ID_ENV] = launch_id
    if launcher is not None:
        variables[LAUNCHER_ENV] = launcher
    return variables


def export(variables: Mapping[str, str]) -> None:
    """Put ``environment``'s variables into this process's environment, which torchrun's workers
    inherit: the one place the launcher writes the workers' environment."""
    os.environ.update(variables)
