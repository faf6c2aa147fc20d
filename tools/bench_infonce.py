"""Benchmark of the CLIP loss: pyprotoclip's fused op vs its pure-PyTorch reference vs open_clip's
ClipLoss (and Inf-CL on GPU). Forward, backward and forward+backward time (median, p20, p80) and peak
memory; writes benchmarks/results/infonce-<machine>.json and a PNG drawn from it.

    python tools/bench_infonce.py                      # CPU: B in {1024, 4096, 16384}, d=512, fp32
    python tools/bench_infonce.py --quick              # a smoke run
    python tools/bench_infonce.py --small-only --tag T # only the small-shape rows (B=32..256, d=128, vs ClipLoss)
    python tools/bench_infonce.py --device cuda        # GPU: fp32 + bf16 up to B=65536, Inf-CL when installed
    pyprotoclip bench infonce [same options]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tools"), ROOT]  # benchlib, and pyprotoclip from this checkout
import benchlib  # noqa: E402
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def loss_fn(provider: str):
    """A function (image, text, scale) -> scalar loss for one provider."""
    if provider in ("auto", "compiled", "reference"):
        from pyprotoclip.ops import infonce_loss

        return lambda i, t, s: infonce_loss(i, t, s, backend=provider)
    if provider == "open_clip":
        from open_clip.loss import ClipLoss

        clip_loss = ClipLoss()
        return lambda i, t, s: clip_loss(i, t, s)
    if provider == "inf_cl":
        from inf_cl import cal_inf_loss

        return lambda i, t, s: 0.5 * (cal_inf_loss(i, t, scale=s).mean() + cal_inf_loss(t, i, scale=s).mean())
    raise ValueError(f"unknown provider {provider!r}")


def available(provider: str, device: str) -> bool:
    try:
        if provider == "open_clip":
            import open_clip.loss  # noqa: F401
        elif provider == "inf_cl":
            if not device.startswith("cuda"):
                return False
            import inf_cl  # noqa: F401
        elif provider == "compiled":
            import pyprotoclip

            return device.split(":")[0] in pyprotoclip._library.compiled_devices()
    except ImportError:
        return False
    return True


def setup(batch: int, dim: int, dtype: torch.dtype, device: str):
    """Inputs of one measurement: normalised features and a learnable log-scale, as in training."""
    g = torch.Generator(device="cpu").manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    return image, text, log_scale


def measure(provider: str, batch: int, dim: int, dtype_name: str, device: str, repeats: int) -> dict:
    """One (provider, shape, dtype): peak memory of a first forward+backward, then the timings."""
    fn = loss_fn(provider)
    # a first, smaller call loads what every provider loads once (kernels, thread pools, BLAS
    # buffers), so that the peak below is the memory of this shape only
    tiny = setup(min(batch, 2048), dim, DTYPES[dtype_name], device)
    fn(tiny[0], tiny[1], tiny[2].exp()).backward()
    del tiny
    image, text, log_scale = setup(batch, dim, DTYPES[dtype_name], device)

    def forward():
        return fn(image, text, log_scale.exp())

    def forward_backward():
        forward().backward()

    peak = benchlib.peak_bytes(forward_backward, device=device)
    row = {"provider": provider, "B": batch, "d": dim, "dtype": dtype_name, "peak_bytes": peak,
           "bytes_per_logit": peak / (batch * batch)}
    with torch.no_grad():
        row["forward"] = benchlib.time_ms(forward, device=device, repeats=repeats)
    row["forward_backward"] = benchlib.time_ms(forward_backward, device=device, repeats=repeats)
    row["backward"] = {k: max(0.0, row["forward_backward"][k] - row["forward"][k]) for k in ("median_ms", "p20_ms", "p80_ms")}
    row["backward"]["note"] = "forward_backward - forward"
    if provider == "compiled" and dtype_name == "fp32":
        # single-process fwd+bwd cannot avoid 4 (B, d) x (d, B)-sized products at O(B d) memory: the
        # logits, the logits again in the backward, dI = G T and dT = G^T I
        shapes = [(batch, dim, batch), (batch, dim, batch), (batch, batch, dim), (batch, batch, dim)]
        row["gemm_bound"] = benchlib.gemm_bound(forward_backward, shapes, device=device, repeats=repeats)
    return row


SMALL_PROVIDERS = ("auto", "auto_skip_checks", "compiled", "reference", "open_clip")


def measure_small(batch: int, dim: int, device: str, repeats: int, inner: int) -> dict:
    """Small-batch row: the public op (``backend="auto"``, also inside ``skip_value_checks()`` as the trainer
    calls it, and each backend) and open_clip's ClipLoss, fwd+bwd, interleaved in one process (A B C A B C ...),
    each sample the mean of ``inner`` back-to-back calls."""
    from pyprotoclip.ops import skip_value_checks

    image, text, log_scale = setup(batch, dim, torch.float32, device)
    fns = {}
    for provider in SMALL_PROVIDERS:
        if provider in ("compiled", "open_clip") and not available(provider, device):
            continue
        fn = loss_fn("auto" if provider == "auto_skip_checks" else provider)
        checks = skip_value_checks if provider == "auto_skip_checks" else contextlib.nullcontext

        def run(fn=fn, checks=checks):
            with checks():
                for _ in range(inner):
                    fn(image, text, log_scale.exp()).backward()

        fns[provider] = run
    timed = benchlib.interleaved_ms(fns, device=device, repeats=repeats, warmup=3)
    samples = timed.pop("_samples")
    row = {"kind": "small", "B": batch, "d": dim, "dtype": "fp32", "inner": inner, "repeats": repeats}
    for provider, t in timed.items():
        row[provider] = {k: (v / inner if k.endswith("_ms") else v) for k, v in t.items()}
    if "open_clip" in samples:
        for provider in fns:
            if provider != "open_clip":
                ratios = [a / b for a, b in zip(samples[provider], samples["open_clip"])]
                row[f"{provider}_over_open_clip"] = statistics.median(ratios)
    return row


def plot(results_path: str) -> str:
    """PNG of forward+backward time and peak memory vs batch size, from a results JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_path) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if "error" not in r and r.get("kind") != "small"]
    small = sorted((r for r in data["rows"] if r.get("kind") == "small"), key=lambda r: r["B"])
    fig, axes = plt.subplots(1, 3 if small else 2, figsize=(16 if small else 11, 4))
    if small:
        for key in [k for k in small[0] if k.endswith("_over_open_clip")]:
            axes[2].plot([r["B"] for r in small], [r[key] for r in small], marker="o", label=key.replace("_over_open_clip", ""))
        axes[2].axhline(1.0, color="k", lw=0.5)
        axes[2].set_xscale("log", base=2)
        axes[2].set_xlabel("B (d = %d, fp32)" % small[0]["d"])
        axes[2].set_ylabel("fwd+bwd time / ClipLoss (interleaved)")
        axes[2].set_title("small batches")
        axes[2].grid(True, which="both", alpha=0.3)
        axes[2].legend(fontsize=8)
    for key in sorted({(r["provider"], r["dtype"]) for r in rows}):
        sel = sorted((r for r in rows if (r["provider"], r["dtype"]) == key), key=lambda r: r["B"])
        label = f"{key[0]} ({key[1]})"
        axes[0].errorbar([r["B"] for r in sel], [r["forward_backward"]["median_ms"] for r in sel],
                         yerr=[[r["forward_backward"]["median_ms"] - r["forward_backward"]["p20_ms"] for r in sel],
                               [r["forward_backward"]["p80_ms"] - r["forward_backward"]["median_ms"] for r in sel]],
                         marker="o", label=label, capsize=3)
        axes[1].plot([r["B"] for r in sel], [r["peak_bytes"] / 2**20 for r in sel], marker="o", label=label)
    for ax, title, unit in ((axes[0], "forward + backward time", "ms (median, p20-p80)"), (axes[1], "peak extra memory", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch B (d = %d)" % rows[0]["d"])
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"CLIP loss - {data['environment']['device']}", fontsize=10)
    fig.tight_layout()
    out = results_path[: -len(".json")] + ".png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16")
    parser.add_argument("--providers", default="compiled,reference,open_clip,inf_cl")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats: a smoke run")
    parser.add_argument("--shared", default=None, help="a note for the JSON when the machine was shared with other jobs")
    parser.add_argument("--tag", default=None, help="file-name tag (default: the machine's name)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--small-sizes", type=lambda s: [int(x) for x in s.split(",")] if s else [], default=[32, 64, 128, 256],
                        help="batch sizes of the small-shape row (d=128, fp32, vs ClipLoss); empty to skip")
    parser.add_argument("--small-only", action="store_true", help="only the small-shape rows")
    parser.add_argument("--small-repeats", type=int, default=None, help="interleaved samples per small size")
    parser.add_argument("--worker-small", nargs=4, metavar=("B", "D", "REPEATS", "INNER"), help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=5, metavar=("PROVIDER", "B", "D", "DTYPE", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker_small:
        batch, dim, repeats, inner = (int(v) for v in args.worker_small)
        print(json.dumps(measure_small(batch, dim, args.device, repeats, inner)))
        return
    if args.worker:
        provider, batch, dim, dtype_name, repeats = args.worker
        print(json.dumps(measure(provider, int(batch), int(dim), dtype_name, args.device, int(repeats))))
        return

    gpu = args.device.startswith("cuda")
    sizes = [] if args.small_only else args.sizes or ([512, 1024] if args.quick else ([4096, 16384, 32768, 65536] if gpu else [1024, 4096, 16384]))
    dtypes = (args.dtypes or ("fp32,bf16" if gpu else "fp32")).split(",")
    repeats = args.repeats or (3 if args.quick else (20 if gpu else 5))
    providers = [p for p in args.providers.split(",") if available(p, args.device)]
    print(f"device: {benchlib.device_name(args.device)}; providers: {providers}; sizes: {sizes}; dtypes: {dtypes}")

    rows = []
    for dtype_name in dtypes:
        for batch in sizes:
            for provider in providers:
                if gpu and dtype_name == "fp32" and batch > 32768:
                    continue  # the materialising providers run out of memory; bf16 covers the large sizes
                try:
                    row = benchlib.run_isolated(__file__, ["--device", args.device, "--worker", provider, str(batch), str(args.dim), dtype_name, str(repeats)])
                except RuntimeError as exc:
                    print(f"  {provider:10s} B={batch:6d} {dtype_name}: FAILED ({str(exc).splitlines()[-1]})")
                    row = {"provider": provider, "B": batch, "d": args.dim, "dtype": dtype_name, "error": str(exc)[-500:]}
                    rows.append(row)
                    continue
                rows.append(row)
                fb = row["forward_backward"]
                print(f"  {provider:10s} B={batch:6d} {dtype_name}: fwd+bwd {fb['median_ms']:9.1f} ms "
                      f"[{fb['p20_ms']:.1f}, {fb['p80_ms']:.1f}]  peak {row['peak_bytes'] / 2**20:8.1f} MiB "
                      f"({row['bytes_per_logit']:.3f} B/logit)")
    small_repeats = args.small_repeats or (30 if args.quick else 100)
    for batch in (args.small_sizes if args.dim else []):
        row = benchlib.run_isolated(__file__, ["--device", args.device, "--worker-small", str(batch), "128", str(small_repeats), "10"])
        rows.append(row)
        print(f"  small B={batch:4d} d=128 fp32 fwd+bwd: " + ", ".join(
            f"{p} {row[p]['median_ms'] * 1e3:.0f} us" for p in SMALL_PROVIDERS if p in row)
            + "; " + ", ".join(f"{k} x{v:.2f}" for k, v in row.items() if k.endswith("_over_open_clip")))
    ok = [r for r in rows if "error" not in r and r.get("kind") != "small"]
    summary = summarize(ok) + summarize_small([r for r in rows if r.get("kind") == "small"])
    for line in summary:
        print(line)
    # smoke runs go to an ignored folder: they are not results
    out_dir = os.path.join(args.out, "quick") if args.quick else args.out
    path = os.path.join(out_dir, f"infonce-{args.tag or benchlib.device_tag(args.device)}.json")
    env = benchlib.environment(args.device)
    env["summary"] = summary
    if args.shared:
        env["shared_machine"] = args.shared
    benchlib.write_results(path, rows, env)
    if ok:
        plot(path)


def summarize(rows: list[dict]) -> list[str]:
    """Ratios of the compiled op against the reference and open_clip, per (B, dtype)."""
    lines = []
    by_key = {(r["provider"], r["B"], r["dtype"]): r for r in rows}
    for (provider, batch, dtype_name), r in sorted(by_key.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if provider != "compiled":
            continue
        for peer in ("reference", "open_clip", "inf_cl"):
            p = by_key.get((peer, batch, dtype_name))
            if p:
                t = r["forward_backward"]["median_ms"] / p["forward_backward"]["median_ms"]
                m = r["peak_bytes"] / max(p["peak_bytes"], 1)
                lines.append(f"B={batch} {dtype_name}: compiled/{peer}: time x{t:.2f}, peak memory x{m:.3f}")
        if "gemm_bound" in r:
            gb = r["gemm_bound"]
            lines.append(f"B={batch} {dtype_name}: compiled fwd+bwd x{gb['x_gemm_bound']:.2f} GEMM bound "
                         f"({gb['op_ms']['median_ms']:.1f} ms vs 4 GEMMs {gb['gemm_ms']['median_ms']:.1f} ms)")
    return lines


def summarize_small(rows: list[dict]) -> list[str]:
    return [f"small B={r['B']} d={r['d']}: " + ", ".join(f"{k.replace('_over_', '/')} x{v:.2f}" for k, v in r.items()
                                                        if k.endswith("_over_open_clip")) for r in rows]


if __name__ == "__main__":
    main()
