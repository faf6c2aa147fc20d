"""Benchmark of k-means: time per Lloyd iteration and final objective of pyprotoclip.cluster.KMeans
(compiled kernels and the pure-PyTorch reference) against faiss-cpu with the same thread count, and
on a GPU against fastkmeans (when installed) and the torch reference.

    python tools/bench_kmeans.py                 # CPU: N in {100k, 1M} x d in {128, 256} x K in {1024, 16384}
                                                 #      plus the target N=200k, d=128, K=4096 (long on few cores)
    python tools/bench_kmeans.py --quick         # the target shape and one small shape, 4 iterations
    python tools/bench_kmeans.py --shapes 200000x128x4096,100000x128x1024
    pyprotoclip bench kmeans [--quick]           # the same through the CLI

Every provider runs the same data (Gaussian mixture, fp32) with init="random", max_points_per_centroid=256
and tol=0 for ``--iters`` iterations; per-iteration wall times come from each run (KMeans.iteration_times_,
faiss's iteration_stats) and are summarised as median/p20/p80 over the iterations. The objective is the
final inertia over all points (sum of squared distances to the nearest centroid). Threads: torch and faiss
both use --threads (torch.set_num_threads / faiss.omp_set_num_threads). Each (provider, shape) runs in a
fresh process so that its CPU peak memory (growth of peak RSS, tools/benchlib.py) is its own.
Results: benchmarks/results/kmeans-<device>.json and a PNG drawn from it by ``plot``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import benchlib  # noqa: E402

FULL_SHAPES = [(n, d, k) for n in (100_000, 1_000_000) for d in (128, 256) for k in (1024, 16384)]
TARGET = (200_000, 128, 4096)
QUICK_SHAPES = [(20_000, 64, 256), TARGET]
GPU_SHAPES = [(1_000_000, 128, 16384), (200_000, 128, 4096)]
# The reference materialises (n, k) fp32 matrices (a few at once): skip it beyond this many elements.
REFERENCE_MAX_ELEMS = 400_000_000


def make_data(n: int, d: int, k: int, device: str) -> torch.Tensor:
    """A Gaussian mixture with k true centres (so the objective has structure), fp32 (n, d)."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(k, d, generator=g) * 2.0
    x = centers[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return x.to(device)


def setup(provider: str, n: int, d: int, k: int, iters: int, device: str):
    """Data and a function that runs one full fit; returns (fn, x). The function returns
    (per-iteration seconds, final objective)."""
    x = make_data(n, d, k, device)
    if provider in ("compiled", "reference"):
        from pyprotoclip.cluster import KMeans

        def fn():
            km = KMeans(k, n_iter=iters, init="random", tol=0.0, seed=0, backend=provider).fit(x)
            return km.iteration_times_, km.inertia_
    elif provider == "faiss":
        import faiss

        def fn():
            km = faiss.Kmeans(d, k, niter=iters, seed=0, max_points_per_centroid=256, min_points_per_centroid=1)
            xn = x.cpu().numpy()
            km.train(xn)
            stats = km.iteration_stats
            times = [b["time"] - a["time"] for a, b in zip([{"time": 0.0}] + stats[:-1], stats)]
            dist, _ = km.index.search(xn, 1)
            return times, float(dist.astype("float64").sum())
    elif provider == "fastkmeans":
        from fastkmeans import FastKMeans

        def fn():
            km = FastKMeans(d, k, niter=iters, seed=0, max_points_per_centroid=256, device=device, verbose=False)
            xn = x.cpu().numpy()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            km.train(xn)
            torch.cuda.synchronize()
            total = time.perf_counter() - t0  # fastkmeans does not report per-iteration times
            c = torch.from_numpy(km.centroids).to(device)
            obj = float(torch.cdist(x, c).amin(1).square().double().sum())
            return [total / iters] * iters, obj
    else:
        raise ValueError(f"provider: unknown {provider!r}")
    return fn, x


def measure_one(provider: str, n: int, d: int, k: int, iters: int, threads: int, device: str) -> dict:
    torch.set_num_threads(threads)
    if provider == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
    fn, x = setup(provider, n, d, k, iters, device)
    out: dict = {}

    def run():
        out["times"], out["objective"] = fn()

    peak = benchlib.peak_bytes(run, device=device)
    gb = None
    if provider == "compiled":
        # one kmeans_update call (the public op, checks included) against the one (N, d) x (d, K) product it
        # cannot avoid, interleaved; centroids: K points of x
        from pyprotoclip.ops import kmeans_update

        cent = x[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k].to(x.device)].contiguous()
        gb = benchlib.gemm_bound(lambda: kmeans_update(x, cent, backend="compiled"), [(n, d, k)], device=device,
                                 repeats=max(5, iters))
    times = sorted(t * 1e3 for t in out["times"])
    q = lambda p: times[min(len(times) - 1, int(round(p * (len(times) - 1))))]  # noqa: E731
    return {"provider": provider, "n": n, "d": d, "k": k, "dtype": "float32", "iters": iters, "threads": threads,
            "median_ms": times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2]),
            "p20_ms": q(0.2), "p80_ms": q(0.8), "objective": out["objective"], "peak_bytes": peak,
            **({"gemm_bound": gb} if gb else {})}


def plot(json_path: str, png_path: str | None = None) -> str:
    """Draw per-iteration time (bars, median with p20-p80) and objective ratios from the results JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        data = json.load(f)
    rows = data["rows"]
    shapes = sorted({(r["n"], r["d"], r["k"]) for r in rows})
    providers = sorted({r["provider"] for r in rows})
    fig, (ax_t, ax_o) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(providers))
    for pi, p in enumerate(providers):
        xs, med, lo, hi, ratio_x, ratio = [], [], [], [], [], []
        for si, s in enumerate(shapes):
            r = next((r for r in rows if r["provider"] == p and (r["n"], r["d"], r["k"]) == s), None)
            if r is None:
                continue
            xs.append(si + pi * width)
            med.append(r["median_ms"])
            lo.append(r["median_ms"] - r["p20_ms"])
            hi.append(r["p80_ms"] - r["median_ms"])
            base = next((b for b in rows if b["provider"] in ("faiss", "fastkmeans") and (b["n"], b["d"], b["k"]) == s), None)
            if base is not None:
                ratio_x.append(si + pi * width)
                ratio.append(r["objective"] / base["objective"])
        ax_t.bar(xs, med, width, yerr=[lo, hi], label=p)
        ax_o.bar(ratio_x, ratio, width, label=p)
    labels = [f"N={n // 1000}k\nd={d} K={k}" for n, d, k in shapes]
    for ax in (ax_t, ax_o):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], labels, fontsize=8)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("ms per iteration (median, p20-p80)")
    ax_t.set_yscale("log")
    ax_o.set_ylabel("final objective / peer's")
    ax_o.axhline(1.0, color="k", lw=0.5)
    lo_r = min([0.99] + [b.get_height() for b in ax_o.patches])
    hi_r = max([1.01] + [b.get_height() for b in ax_o.patches])
    ax_o.set_ylim(lo_r - 0.005, hi_r + 0.005)
    env = data["environment"]
    fig.suptitle(f"k-means, {env['device']}, torch {env['torch']}, {env['commit']}", fontsize=9)
    fig.tight_layout()
    png_path = png_path or json_path[: -len(".json")] + ".png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    print(f"wrote {png_path}")
    return png_path


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        n, d, k = (int(v) for v in item.lower().split("x"))
        shapes.append((n, d, k))
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="target shape + one small shape, 4 iterations")
    ap.add_argument("--shapes", type=str, default=None, help="comma-separated NxdxK, e.g. 200000x128x4096")
    ap.add_argument("--iters", type=int, default=None, help="Lloyd iterations per run (default 8, quick 4)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--providers", type=str, default=None, help="comma-separated subset of the providers")
    ap.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=str, default=None, help="results JSON (default benchmarks/results/kmeans-<device>.json)")
    ap.add_argument("--shared", type=str, default=None, help="a note for the JSON when the machine was shared with other jobs")
    ap.add_argument("--one", type=str, default=None, help=argparse.SUPPRESS)  # provider,n,d,k,iters,threads
    args = ap.parse_args()

    if args.one:  # child process: one measurement, JSON on the last line
        p, n, d, k, iters, threads = args.one.split(",")
        print(json.dumps(measure_one(p, int(n), int(d), int(k), int(iters), int(threads), args.device)))
        return

    gpu = args.device.startswith("cuda")
    shapes = _parse_shapes(args.shapes) if args.shapes else (QUICK_SHAPES if args.quick else (GPU_SHAPES if gpu else FULL_SHAPES + [TARGET]))
    iters = args.iters or (4 if args.quick else 8)
    providers = ["compiled", "reference"] + (["fastkmeans"] if gpu else ["faiss"])
    if args.providers:
        providers = args.providers.split(",")
    env = benchlib.environment(args.device)
    env["threads"] = args.threads
    if args.shared:
        env["shared_machine"] = args.shared
    rows = []
    for n, d, k in shapes:
        for p in providers:
            if p == "reference" and n * k > REFERENCE_MAX_ELEMS:
                print(f"skip reference at N={n} K={k}: it materialises the (N, K) matrix")
                continue
            try:
                if gpu:
                    row = measure_one(p, n, d, k, iters, args.threads, args.device)
                else:
                    row = benchlib.run_isolated(os.path.abspath(__file__), ["--one", f"{p},{n},{d},{k},{iters},{args.threads}", "--device", args.device])
            except (ImportError, RuntimeError) as exc:
                print(f"skip {p} at N={n} d={d} K={k}: {str(exc).strip().splitlines()[-1]}")
                continue
            rows.append(row)
            print(f"{p:>10} N={n:>8} d={d:>4} K={k:>6}: {row['median_ms']:9.1f} ms/iter "
                  f"(p20 {row['p20_ms']:.1f}, p80 {row['p80_ms']:.1f}), objective {row['objective']:.6g}, "
                  f"peak {row['peak_bytes'] / 2**20:.0f} MiB", flush=True)
            if "gemm_bound" in row:
                gb = row["gemm_bound"]
                print(f"{'':>10} kmeans_update x{gb['x_gemm_bound']:.2f} GEMM bound ({gb['op_ms']['median_ms']:.1f} ms "
                      f"vs the (N, d) x (d, K) GEMM {gb['gemm_ms']['median_ms']:.1f} ms)", flush=True)
    peer = "fastkmeans" if gpu else "faiss"
    for n, d, k in shapes:
        ours = next((r for r in rows if r["provider"] == "compiled" and (r["n"], r["d"], r["k"]) == (n, d, k)), None)
        base = next((r for r in rows if r["provider"] == peer and (r["n"], r["d"], r["k"]) == (n, d, k)), None)
        if ours and base:
            print(f"N={n} d={d} K={k}: compiled / {peer}: time x{ours['median_ms'] / base['median_ms']:.2f}, "
                  f"objective x{ours['objective'] / base['objective']:.4f}")
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"kmeans-{benchlib.device_tag(args.device)}.json")
    benchlib.write_results(out, rows, env)
    plot(out)


if __name__ == "__main__":
    main()
