"""Benchmark of the prototype-assignment cross-entropy (pyprotoclip.ops.proto_cross_entropy): time and peak
memory of the compiled kernels against the pure-PyTorch reference (and Apple's cut-cross-entropy for hard
targets on a GPU, when installed), for hard, soft and teacher targets.

    python tools/bench_proto_softmax.py            # CPU: B=8192, d=128, K in {1024, 8192, 32768}, fp32
    python tools/bench_proto_softmax.py --quick    # small smoke run
    python tools/bench_proto_softmax.py --small-only --tag T   # only the small-shape rows (B x K = 32x64 .. 256x1024)
    pyprotoclip bench proto [--quick]              # the same through the CLI

On a GPU (when CUDA is available) it runs B=32768, d=128, K=65536 in bf16 instead.

Timing: after one warm-up, each repetition times the forward (loss), the backward (loss.backward()) and their
sum, with a device synchronisation around each; reported are the median and 20th/80th percentiles over the
repetitions (>= 5 on CPU, >= 20 on GPU). Peak memory is measured in separate runs:
  * GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus what was allocated before.
  * CPU: torch has no CPU peak counter, so a background thread polls the process's resident set size
    (/proc/self/statm) every 0.5 ms during the call; peak bytes = max RSS seen - RSS just before. The ops'
    big buffers are page-faulted in when first written and returned to the OS when freed (glibc serves
    allocations above its mmap threshold with mmap), so RSS follows the live tensors. It is a lower bound:
    allocations that live less than the polling interval can be missed, and ones below glibc's (dynamic,
    at most 32 MiB) mmap threshold may reuse heap pages that are already resident and then do not show
    at all (the compiled teacher mode's two 16 MiB block buffers can read as 0). Both only matter for
    small allocations; the reference's (B, K) tensors are far above them.
Results: benchmarks/results/proto_softmax-<device>.json (one row per provider, mode, shape, dtype and phase)
and a PNG drawn from that JSON by ``plot``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import benchlib  # noqa: E402
from pyprotoclip.ops import reference as reference_ops  # noqa: E402
from pyprotoclip.ops.proto_softmax import proto_cross_entropy  # noqa: E402

MODES = ("hard", "soft", "teacher")
TAU, TAU_T = 0.1, 0.05


# ---- setup (shared by the time and memory measurements) --------------------------------------------


def setup(provider: str, mode: str, b: int, k: int, d: int, dtype: torch.dtype, device: str) -> tuple[Callable, list]:
    """Inputs for one configuration and a function that runs the loss forward; returns (fn, leaves)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    f = F.normalize(torch.randn(b, d, generator=gen), dim=1).to(device=device, dtype=dtype).requires_grad_()
    p = F.normalize(torch.randn(k, d, generator=gen), dim=1).to(device=device, dtype=dtype).requires_grad_()
    tau = torch.tensor(TAU, device=device, requires_grad=True)
    if mode == "hard":
        kw = {"target": torch.randint(0, k, (b,), generator=gen).to(device)}
    elif mode == "soft":
        q = torch.rand(b, k, generator=gen).to(device)
        kw = {"target": (q / q.sum(1, keepdim=True)).to(dtype)}
    else:
        t = F.normalize(torch.randn(b, d, generator=gen), dim=1).to(device=device, dtype=dtype)
        c = F.normalize(torch.randn(k, d, generator=gen), dim=1).to(device=device, dtype=dtype)
        kw = {"teacher_features": t, "teacher_prototypes": c, "teacher_temperature": TAU_T}
    if provider in ("auto", "compiled", "reference"):
        def fn():
            return proto_cross_entropy(f, p, tau, backend=provider, **kw)
    elif provider == "bare_reference":
        # reference.py's formula called directly: no argument checks, no backend choice (hard targets)
        def fn():
            return reference_ops.proto_softmax_loss(f, p, tau, kw["target"])[0].mean()
    elif provider == "cut_cross_entropy":
        from cut_cross_entropy import linear_cross_entropy

        def fn():
            # logits (f / tau) p^T: the same loss, with tau folded into the embeddings
            return linear_cross_entropy((f / tau).to(dtype), p, kw["target"])
    else:
        raise ValueError(f"provider: unknown {provider!r}")
    return fn, [f, p, tau]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _zero_grads(leaves: list) -> None:
    for leaf in leaves:
        leaf.grad = None


def time_config(fn: Callable, leaves: list, device: str, reps: int) -> dict[str, list[float]]:
    """ms per phase over ``reps`` repetitions, after one warm-up."""
    out: dict[str, list[float]] = {"forward": [], "backward": [], "fwd+bwd": []}
    for rep in range(reps + 1):
        _zero_grads(leaves)
        _sync(device)
        t0 = time.perf_counter()
        loss = fn()
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        del loss
        if rep == 0:
            continue
        out["forward"].append(1e3 * (t1 - t0))
        out["backward"].append(1e3 * (t2 - t1))
        out["fwd+bwd"].append(1e3 * (t2 - t0))
    return out


class RssSampler:
    """Peak resident set size of this process while in the ``with`` block (see the module docstring)."""

    def __init__(self, interval_s: float = 5e-4):
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def peak_bytes(fn: Callable, leaves: list, device: str, phase: str) -> int:
    """Peak extra bytes of one forward (``phase='forward'``) or forward+backward call."""
    _zero_grads(leaves)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = fn()
        if phase != "forward":
            loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with RssSampler() as sampler:
            loss = fn()
            if phase != "forward":
                loss.backward()
        peak = sampler.peak - sampler.start
    del loss
    _zero_grads(leaves)
    return int(peak)


# ---- the run --------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_slug(device: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower().split("(")[0]).strip("-")
    return (device if device == "cpu" and not slug else f"{device}-{slug}")[:48]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def configs(args: argparse.Namespace, device: str) -> tuple[list[tuple[int, int, int]], torch.dtype, list[str]]:
    providers = ["compiled", "reference"]
    if device == "cuda":
        shapes = [(512, 4096, 128)] if args.quick else [(32768, 65536, 128)]
        dtype = torch.bfloat16
        try:
            import cut_cross_entropy  # noqa: F401

            providers.append("cut_cross_entropy")
        except ImportError:
            print("cut-cross-entropy is not installed: `pip install cut-cross-entropy` to compare against it")
    else:
        ks = [256, 1024] if args.quick else args.ks
        shapes = [(512 if args.quick else args.batch, k, args.dim) for k in ks]
        dtype = torch.float32
    return shapes, dtype, providers


def run(args: argparse.Namespace) -> dict:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    shapes, dtype, providers = configs(args, device)
    if args.small_only:
        shapes = []
    reps = max(args.reps, 20 if device == "cuda" else 5)
    rows = []
    for b, k, d in shapes:
        for mode in args.modes:
            for provider in providers:
                if provider == "cut_cross_entropy" and mode != "hard":
                    continue
                fn, leaves = setup(provider, mode, b, k, d, dtype, device)
                try:
                    times = time_config(fn, leaves, device, reps)
                    peaks = {phase: peak_bytes(fn, leaves, device, phase) for phase in ("forward", "fwd+bwd")}
                except torch.OutOfMemoryError as exc:  # the reference at full size may not fit a GPU
                    print(f"{provider} {mode} B={b} K={k}: out of memory ({exc})")
                    continue
                finally:
                    del fn, leaves
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                gb = None
                if provider == "compiled" and mode == "hard" and dtype == torch.float32:
                    # hard targets, frozen prototypes: the logits F P^T and dF = G P, 2 x (B d K)
                    fn_gb, leaves_gb = setup(provider, mode, b, k, d, dtype, device)
                    leaves_gb[1].requires_grad_(False)

                    def fwd_bwd(fn_gb=fn_gb, leaves_gb=leaves_gb):
                        _zero_grads(leaves_gb)
                        fn_gb().backward()

                    gb = benchlib.gemm_bound(fwd_bwd, [(b, d, k), (b, k, d)], device=device, repeats=reps)
                    del fn_gb, leaves_gb
                for phase, values in times.items():
                    q = statistics.quantiles(values, n=10, method="inclusive")
                    row = {
                        "provider": provider, "mode": mode, "B": b, "K": k, "d": d, "dtype": str(dtype).replace("torch.", ""),
                        "phase": phase, "median_ms": statistics.median(values), "p20_ms": q[1], "p80_ms": q[7],
                        "reps": len(values), "peak_bytes": peaks.get(phase),
                    }
                    if gb is not None and phase == "fwd+bwd":
                        row["gemm_bound_frozen_prototypes"] = gb
                    rows.append(row)
                if gb is not None:
                    print(f"{'':>18} hard B={b} K={k}: fwd+bwd (frozen prototypes) x{gb['x_gemm_bound']:.2f} GEMM bound "
                          f"({gb['op_ms']['median_ms']:.1f} ms vs 2 GEMMs {gb['gemm_ms']['median_ms']:.1f} ms)", flush=True)
                print(
                    f"{provider:>18} {mode:>7} B={b} K={k:>6} d={d}: fwd+bwd {statistics.median(times['fwd+bwd']):9.1f} ms "
                    f"(fwd {statistics.median(times['forward']):8.1f}, bwd {statistics.median(times['backward']):8.1f}), "
                    f"peak fwd+bwd {peaks['fwd+bwd'] / 2**20:9.1f} MiB",
                    flush=True,
                )
    for b, k in ([] if device == "cuda" else args.small):
        rows.append(small_row(b, k, 128, device, args.small_repeats or (30 if args.quick else 100), 10))
        r = rows[-1]
        print(f"small hard B={b} K={k} d=128: " + ", ".join(f"{p} {r[p]['median_ms'] * 1e3:.0f} us" for p in SMALL_PROVIDERS)
              + "; " + ", ".join(f"{key} x{v:.2f}" for key, v in r.items() if "_over_" in key), flush=True)
    return {
        "op": "proto_softmax",
        "device": device,
        "device_name": device_name(device),
        "torch_version": str(torch.__version__),
        "cuda_version": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "memory_method": "cuda max_memory_allocated delta" if device == "cuda" else "peak RSS delta, /proc/self/statm polled every 0.5 ms",
        "rows": rows,
    }


SMALL_PROVIDERS = ("auto", "auto_skip_checks", "compiled", "reference", "bare_reference")


def small_row(b: int, k: int, d: int, device: str, repeats: int, inner: int) -> dict:
    """Small-shape row (hard targets, fp32): the public op with each backend (``auto`` also inside
    ``skip_value_checks()``, as the trainer calls it) and reference.py's formula called bare, fwd+bwd, interleaved
    in one process; each sample is the mean of ``inner`` back-to-back calls."""
    from pyprotoclip.ops import skip_value_checks

    fns = {}
    for provider in SMALL_PROVIDERS:
        fn, leaves = setup("auto" if provider == "auto_skip_checks" else provider, "hard", b, k, d, torch.float32, device)
        checks = skip_value_checks if provider == "auto_skip_checks" else contextlib.nullcontext

        def run(fn=fn, leaves=leaves, checks=checks):
            with checks():
                for _ in range(inner):
                    _zero_grads(leaves)
                    fn().backward()

        fns[provider] = run
    timed = benchlib.interleaved_ms(fns, device=device, repeats=repeats, warmup=3)
    samples = timed.pop("_samples")
    row = {"kind": "small", "mode": "hard", "B": b, "K": k, "d": d, "dtype": "float32", "phase": "fwd+bwd",
           "inner": inner, "reps": repeats}
    for provider, t in timed.items():
        row[provider] = {key: (v / inner if key.endswith("_ms") else v) for key, v in t.items()}
    for provider in ("auto", "auto_skip_checks", "compiled"):
        for peer in ("reference", "bare_reference"):
            row[f"{provider}_over_{peer}"] = statistics.median(a / c for a, c in zip(samples[provider], samples[peer]))
    return row


# ---- plot (from the JSON only) --------------------------------------------------------------------


def plot(json_path: str, png_path: str) -> None:
    """Time (fwd+bwd median with p20-p80 bars) and peak memory per mode and K, one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as fh:
        result = json.load(fh)
    rows = [r for r in result["rows"] if r["phase"] == "fwd+bwd" and r.get("kind") != "small"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (p != "compiled", p))
    ks = sorted({r["K"] for r in rows})
    fig, axes = plt.subplots(2, len(modes), figsize=(4.5 * len(modes), 7), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for col, mode in enumerate(modes):
        for i, provider in enumerate(providers):
            sel = {r["K"]: r for r in rows if r["mode"] == mode and r["provider"] == provider}
            xs = [j + i * width for j, k in enumerate(ks) if k in sel]
            med = [sel[k]["median_ms"] for k in ks if k in sel]
            err = [[sel[k]["median_ms"] - sel[k]["p20_ms"] for k in ks if k in sel],
                   [sel[k]["p80_ms"] - sel[k]["median_ms"] for k in ks if k in sel]]
            axes[0][col].bar(xs, med, width, yerr=err, label=provider, capsize=2)
            axes[1][col].bar(xs, [sel[k]["peak_bytes"] / 2**20 for k in ks if k in sel], width, label=provider)
        for row, ylabel in ((0, "fwd+bwd time (ms)"), (1, "peak extra memory (MiB)")):
            ax = axes[row][col]
            ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(ks))])
            ax.set_xticklabels([f"K={k}" for k in ks])
            ax.set_ylabel(ylabel)
            ax.set_yscale("log")
        axes[0][col].set_title(f"{mode} targets")
    axes[0][0].legend()
    r0 = rows[0] if rows else {"B": "?", "d": "?", "dtype": "?"}
    fig.suptitle(f"proto_cross_entropy, B={r0['B']} d={r0['d']} {r0['dtype']} on {result['device_name']}\n"
                 f"torch {result['torch_version']}, commit {result['git_commit'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run in seconds")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch", type=int, default=8192, help="B on CPU")
    parser.add_argument("--dim", type=int, default=128, help="d on CPU")
    parser.add_argument("--ks", type=int, nargs="+", default=[1024, 8192, 32768], help="K values on CPU")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (at least 5 on CPU, 20 on GPU)")
    parser.add_argument("--small", type=lambda v: [tuple(int(x) for x in item.split("x")) for item in v.split(",")] if v else [],
                        default=[(32, 64), (64, 256), (128, 1024), (256, 1024)],
                        help="BxK shapes of the small-shape row (hard targets, d=128, fp32), e.g. 32x64,64x256; '' to skip")
    parser.add_argument("--small-only", action="store_true", help="only the small-shape rows")
    parser.add_argument("--small-repeats", type=int, default=None, help="interleaved samples per small shape")
    parser.add_argument("--shared", default=None, help="a note for the JSON when the machine was shared with other jobs")
    parser.add_argument("--tag", default=None, help="file-name tag (default: the device's name)")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--no-save", action="store_true", help="print only; write no JSON or PNG")
    args = parser.parse_args(argv)
    result = run(args)
    if args.no_save:
        return
    os.makedirs(args.out_dir, exist_ok=True)
    if args.shared:
        result["shared_machine"] = args.shared
    stem = f"proto_softmax-{args.tag or device_slug(result['device'])}" + ("-quick" if args.quick else "")
    json_path = os.path.join(args.out_dir, stem + ".json")
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=1)
    if any(r.get("kind") != "small" for r in result["rows"]):
        plot(json_path, os.path.join(args.out_dir, stem + ".png"))
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
