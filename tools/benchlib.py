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
