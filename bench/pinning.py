"""Where the first pinned checkpoint's ~22 s go, and which part blocks the training thread.

DCP's pinned staging (``StateDictStager`` with ``share_memory`` and ``pin_memory``) does, per
tensor storage: ``UntypedStorage._new_shared`` (a /dev/shm file, pages not yet touched),
``cudaHostRegister`` (faults every page in and locks it), then the GPU->host copy. This harness
times each phase on the 8-layer Llama 3.1 8B proxy's checkpoint shapes (fp32 parameters and two
AdamW moments: ~33.5 GB) and, separately, how much a GPU "training" loop on the main thread is
slowed down while another thread does each phase.

    python -m bench.pinning --out bench/results            # GPU machine, ~3 min

Cases (one fresh process each):
- ``fg-torch``: the stock sequence on the main thread (torch's cudart binding for the register);
- ``fg-prefault``: pages touched first (``memset`` via ctypes, one thread), then registered;
- ``fg-hostalloc``: ``cudaHostAlloc`` through torch's pinned allocator (not shareable: reference);
- ``bg-torch`` / ``bg-ctypes``: a background thread does alloc+touch, then register, then copy,
  while the main thread runs a fixed GPU loop; the loop's lost time is attributed to each phase.
  ``bg-torch`` registers through torch's binding, ``bg-ctypes`` through ``cuMemHostRegister`` via
  ctypes (which releases the GIL for certain).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

DIM, KV, HIDDEN, VOCAB, LAYERS = 4096, 1024, 14336, 128256, 8


def proxy_sizes(scale: float = 1.0) -> list[int]:
    """Byte sizes of the proxy checkpoint's storages: fp32 params, AdamW exp_avg and exp_avg_sq."""
    shapes = [(VOCAB, DIM), (VOCAB, DIM), (DIM,)]
    for _ in range(LAYERS):
        shapes += [
            (DIM, DIM),
            (KV, DIM),
            (KV, DIM),
            (DIM, DIM),
            (HIDDEN, DIM),
            (DIM, HIDDEN),
            (HIDDEN, DIM),
            (DIM,),
            (DIM,),
        ]
    sizes = []
    for s in shapes:
        n = 4
        for d in s:
            n *= d
        sizes.append(int(n * scale))
    return sizes * 3


def _libc():
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.memset.restype = ctypes.c_void_p
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    return libc


def _cuda_driver():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    lib.cuMemHostRegister_v2.restype = ctypes.c_int
    return lib


class Staging:
    """The three phases of DCP's pinned staging, each over all storages, with timings."""

    def __init__(self, sizes: list[int], register: str, touch: bool):
        self.sizes, self.register, self.touch = sizes, register, touch
        self.storages: list = []
        self.phases: dict[str, tuple[float, float]] = {}

    def run(self, src) -> None:
        import torch

        torch.cuda.set_device(0)  # makes the primary context current on this thread (driver calls)
        t = time.perf_counter()
        libc = _libc()
        for n in self.sizes:
            s = torch.UntypedStorage._new_shared(n, device="cpu")
            if self.touch:
                libc.memset(s.data_ptr(), 0, n)  # ctypes: the GIL is released for the call
            self.storages.append(s)
        self.phases["alloc" + ("+touch" if self.touch else "")] = (t, time.perf_counter())
        t = time.perf_counter()
        if self.register == "torch":
            import torch.cuda._pin_memory_utils as pmu

            for s in self.storages:
                pmu.pin_memory(s.data_ptr(), s.nbytes())
        elif self.register == "ctypes":
            drv = _cuda_driver()
            for s in self.storages:
                rc = drv.cuMemHostRegister_v2(s.data_ptr(), s.nbytes(), 1)  # PORTABLE
                if rc != 0:
                    raise RuntimeError(f"cuMemHostRegister failed: {rc}")
        self.phases["register"] = (t, time.perf_counter())
        t = time.perf_counter()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for s in self.storages:
                n = s.nbytes()
                dst = torch.empty(0, dtype=torch.uint8).set_(s, 0, (n,), (1,))
                dst.copy_(src[:n], non_blocking=True)
        stream.synchronize()
        self.phases["copy"] = (t, time.perf_counter())

    def seconds(self) -> dict[str, float]:
        return {k: round(b - a, 3) for k, (a, b) in self.phases.items()}


def gpu_loop_step(a, b, xs) -> None:
    """A fixed GPU step: 24 matmuls and ~480 small kernels, launched from this thread."""
    for _ in range(24):
        c = a @ b
        for x in xs:
            x.mul_(1.0001).add_(0.0001)
        del c


def case_fg(name: str, sizes: list[int]) -> dict:
    import torch

    src = torch.empty(max(sizes), dtype=torch.uint8, device="cuda")
    if name == "fg-hostalloc":
        t = time.perf_counter()
        bufs = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for n in sizes]
        alloc = time.perf_counter() - t
        t = time.perf_counter()
        for b in bufs:
            b.copy_(src[: b.numel()], non_blocking=True)
        torch.cuda.synchronize()
        return {"alloc+register": round(alloc, 3), "copy": round(time.perf_counter() - t, 3)}
    st = Staging(sizes, register="torch", touch=name == "fg-prefault")
    st.run(src)
    return st.seconds()


def case_bg(name: str, sizes: list[int]) -> dict:
    import torch

    src = torch.empty(max(sizes), dtype=torch.uint8, device="cuda")
    a = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    xs = [torch.zeros(4096, device="cuda") for _ in range(10)]
    stamps: list[float] = []

    def step():
        gpu_loop_step(a, b, xs)
        torch.cuda.current_stream().synchronize()
        stamps.append(time.perf_counter())

    for _ in range(30):  # warm-up and the undisturbed step time
        step()
    base = statistics.median(y - x for x, y in zip(stamps[-21:], stamps[-20:]))
    st = Staging(sizes, register="torch" if name == "bg-torch" else "ctypes", touch=True)
    th = threading.Thread(target=st.run, args=(src,))
    stamps.clear()
    stamps.append(time.perf_counter())
    th.start()
    while th.is_alive():
        step()
    th.join()
    for _ in range(5):
        step()
    lost = {}
    for phase, (p0, p1) in st.phases.items():
        extra = 0.0
        for x, y in zip(stamps, stamps[1:]):
            mid = (x + y) / 2
            if p0 <= mid < p1:
                extra += (y - x) - base
        lost[phase] = round(extra, 3)
    return {"phase_s": st.seconds(), "loop_lost_s": lost, "loop_step_s": round(base, 4), "loop_steps": len(stamps) - 1}


def system_info() -> dict:
    info = {}
    for f in ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/mm/transparent_hugepage/shmem_enabled"):
        try:
            info[Path(f).name] = Path(f).read_text().strip()
        except OSError as exc:
            info[Path(f).name] = f"unreadable: {exc.strerror}"
    for cmd in (["df", "-h", "/dev/shm"], ["nproc"], ["uname", "-r"]):
        try:
            info[" ".join(cmd)] = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # pragma: no cover - informative only
        info["torch"] = repr(exc)
    return info


CASES = ["fg-torch", "fg-prefault", "fg-hostalloc", "bg-torch", "bg-ctypes"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the proxy's sizes (CPU smoke: tiny)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child process
    a = p.parse_args(argv)
    sizes = proxy_sizes(a.scale)
    if a.case:
        fn = case_bg if a.case.startswith("bg-") else case_fg
        print("RESULT " + json.dumps(fn(a.case, sizes)), flush=True)
        return 0
    results = {
        "date": dt.date.today().isoformat(),
        "total_gb": round(sum(sizes) / 1e9, 2),
        "storages": len(sizes),
        "system": system_info(),
        "cases": {},
    }
    for case in a.cases.split(","):
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "bench.pinning", "--case", case, "--scale", str(a.scale)],
            capture_output=True,
            text=True,
            timeout=400,
            cwd=Path(__file__).resolve().parent.parent,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        results["cases"][case] = (
            json.loads(line[len("RESULT ") :]) if line else {"error": (proc.stderr or proc.stdout)[-1500:]}
        )
        results["cases"][case]["process_s"] = round(time.perf_counter() - t, 1)
        print(case, json.dumps(results["cases"][case]), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = str(results["system"].get("gpu", "cpu")).replace(" ", "-")
    (out / f"pinning-{results['date']}-{slug}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
