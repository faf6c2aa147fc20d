"""Shared benchmark machinery for tools/bench_*.py: timing, peak memory, machine naming, results files.

Timing: warm up, synchronise, repeat, report median with p20/p80 (ms).
Peak memory: on CUDA, ``max_memory_allocated`` minus what was allocated before the call; on CPU,
each measurement runs in a fresh subprocess and reports the growth of peak RSS (``ru_maxrss``) over
the RSS right before the call, so one provider's allocations never hide another's.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], *, device: str, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median, p20 and p80 wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return {"median_ms": statistics.median(samples), "p20_ms": q[1], "p80_ms": q[7], "repeats": repeats}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(fn: Callable[[], Any], *, device: str) -> int:
    """Extra memory at the peak of one ``fn()`` call (see module docstring for the method)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # ru_maxrss cannot be reset, so this is only meaningful as the first large allocation of a
    # fresh process: run_isolated gives every (provider, shape) its own.
    before = current_rss_bytes()
    fn()
    return max(0, peak_rss_bytes() - before)


def run_isolated(script: str, args: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Run ``python script args`` in a fresh process that prints one JSON object on its last line."""
    # A fixed mmap threshold makes glibc return every large block to the OS when it is freed, so
    # RSS follows live memory instead of keeping freed buffers around for reuse.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def device_tag(device: str) -> str:
    """File-name tag of this machine: results from one machine never overwrite another's."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return slug[:60]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict[str, Any]:
    return {
        "device": device_name(device),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(path: str, rows: list[dict[str, Any]], env: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    print(f"wrote {path}")


# ---- "x GEMM bound": an op's time over the bare matrix products it cannot avoid -------------------

# The kernels' row blocks (csrc/tiling.h): a block holds at most this many fp32 values, and never fewer than
# 16 rows. The GEMM bound is blocked the same way, so it never needs the full (m, n) matrix either.
BLOCK_ELEMS = {"cpu": 8 << 20, "cuda": 64 << 20}
MIN_BLOCK_ROWS = 16


def gemm_fn(shapes: list[tuple[int, int, int]], *, device: str, dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """A function that runs ``torch.mm`` for each ``(m, k, n)`` in ``shapes``: an (m, k) @ (k, n) product,
    in row blocks of the kernels' size (``BLOCK_ELEMS``) into a reused output buffer, so memory stays
    O(block + (m + n) k) as in the ops. Operands are random ``dtype`` tensors on ``device``."""
    budget = BLOCK_ELEMS["cuda" if device.startswith("cuda") else "cpu"]
    g = torch.Generator().manual_seed(0)
    plan = []
    for m, k, n in shapes:
        rows = max(1, min(m, max(MIN_BLOCK_ROWS, budget // max(n, 1))))
        # the left operand of a block: a product with a (B, B) left side (a backward's dI = G T) reads a
        # recomputed block of G, never the whole matrix
        left = torch.randn(rows, k, generator=g).to(device=device, dtype=dtype)
        right = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
        out = torch.empty(rows, n, device=device, dtype=dtype)
        plan.append((m, rows, left, right, out))

    def run() -> None:
        for m, rows, left, right, out in plan:
            for r0 in range(0, m, rows):
                r = min(rows, m - r0)
                torch.mm(left[:r], right, out=out[:r])

    return run


def interleaved_ms(fns: dict[str, Callable[[], Any]], *, device: str, repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """``time_ms`` for several functions in turn (A B A B ...), so that a machine's drift (other jobs on a
    shared machine) hits them alike. Returns each one's median/p20/p80 in ms."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, values in samples.items():
        values = sorted(values)
        q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
        out[name] = {"median_ms": statistics.median(values), "p20_ms": q[1], "p80_ms": q[7], "repeats": repeats}
    out["_samples"] = samples  # type: ignore[assignment]
    return out


def gemm_bound(op: Callable[[], Any], shapes: list[tuple[int, int, int]], *, device: str, repeats: int,
               dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The op's time divided by the time of the matrix products it cannot avoid (``gemm_fn(shapes)``), both
    timed in this process, interleaved. ``x_gemm_bound`` is the median of the per-pair ratios (each op
    run over the GEMM run next to it); 1.0 would be an op whose only cost is those products."""
    timed = interleaved_ms({"op": op, "gemm": gemm_fn(shapes, device=device, dtype=dtype)}, device=device, repeats=repeats)
    samples = timed.pop("_samples")
    ratios = [a / b for a, b in zip(samples["op"], samples["gemm"])]
    return {
        "gemm_shapes_mkn": [list(s) for s in shapes],
        "gemm_dtype": str(dtype).replace("torch.", ""),
        "op_ms": timed["op"],
        "gemm_ms": timed["gemm"],
        "x_gemm_bound": statistics.median(ratios),
        "x_gemm_bound_of_medians": timed["op"]["median_ms"] / timed["gemm"]["median_ms"],
    }
