"""Benchmark of CyCLIP's cyclic regularisers: pyprotoclip's d x d Gram form as the trainer calls it
(``losses.cyclip.cyclic_penalty``, lambda1 * L_I + lambda2 * L_C in one op) against
the CLIP loss it is added to (``ops.infonce_loss``) and against the official code's N x N form
(goel-shashank/CyCLIP src/train.py). Forward and forward+backward time (median, p20, p80), peak memory;
writes benchmarks/results/cyclip-<machine>.json and a PNG drawn from it.

    python tools/bench_cyclip.py                 # CPU: B in {1024, 4096, 16384}, d=512, fp32
    python tools/bench_cyclip.py --quick         # a smoke run (to the ignored benchmarks/results/quick/)
    python tools/bench_cyclip.py --device cuda   # GPU: up to B=65536, fp32 + bf16
    pyprotoclip bench cyclip [same options]

The headline number is the time of the two regularisers relative to the CLIP loss at B=16384, d=512
(goal < 5%), with the recipe's weights lambda1 = lambda2 = 0.25 (provider ``cyclic``: the fused backward
skips b's GEMMs); provider ``cyclic_general`` is the same op with unequal weights 0.25 / 0.5 (all the
backward GEMMs), reported next to it. Because this may run on a shared machine, that ratio is measured a second way too: the two
losses alternately in one process (``interleaved`` rows), so both see the same load; the GEMMs of the
cyclic terms alone (preallocated operands, no autograd) are timed in the same rounds, the floor of the
Gram form on this machine. Memory of the N x N
form is measured where it fits and extrapolated (bytes per pair x B^2) beyond; extrapolated numbers are
labelled as such in the JSON and the PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tools"), ROOT]  # benchlib, and pyprotoclip from this checkout
import benchlib  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("clip", "cyclic", "cyclic_general", "official")
LAMBDA = 0.25  # the recipe's weights, each term
WEIGHTS = {"cyclic": (LAMBDA, LAMBDA), "cyclic_general": (0.25, 0.5), "official": (LAMBDA, LAMBDA)}


def official_cyclic(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's terms (src/train.py, get_loss): N x N logits, squared, mean, / s^2, * N."""
    n = image.shape[0]
    logits_image_per_image = scale * image @ image.t()
    logits_text_per_text = scale * text @ text.t()
    inmodal = (logits_image_per_image - logits_text_per_text).square().mean() / (scale * scale) * n
    logits_text_per_image = scale * image @ text.t()
    crossmodal = (logits_text_per_image - logits_text_per_image.t()).square().mean() / (scale * scale) * n
    return inmodal, crossmodal


def loss_fn(provider: str):
    """(image, text, scale) -> the scalar this provider back-propagates, called as in a training step
    (inside ``ops.skip_value_checks()``: no NaN/Inf scans of the inputs)."""
    from pyprotoclip.ops import skip_value_checks

    fn = _loss_fn(provider)

    def call(i, t, s):
        with skip_value_checks():
            return fn(i, t, s)

    return call


def _loss_fn(provider: str):
    if provider == "clip":
        from pyprotoclip.ops import infonce_loss

        return lambda i, t, s: infonce_loss(i, t, s)
    if provider in ("cyclic", "cyclic_general"):
        from pyprotoclip.losses.cyclip import cyclic_penalty

        w1, w2 = WEIGHTS[provider]

        def cyclic(i, t, s):  # as add_cyclic_terms calls it
            return cyclic_penalty(i, t, w1, w2)[0]

        return cyclic
    if provider == "official":
        def official(i, t, s):
            inmodal, crossmodal = official_cyclic(i, t, s)
            return LAMBDA * inmodal + LAMBDA * crossmodal

        return official
    raise ValueError(f"unknown provider {provider!r}")


def setup(batch: int, dim: int, dtype: torch.dtype, device: str):
    """Inputs of one measurement: normalised features and a learnable log-scale, as in training."""
    g = torch.Generator(device="cpu").manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device=device, dtype=dtype).requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    return image, text, log_scale


def measure(provider: str, batch: int, dim: int, dtype_name: str, device: str, repeats: int, timed: bool) -> dict:
    """One (provider, shape, dtype) in a fresh process: peak memory of a first forward+backward, then
    (if ``timed``) the timings."""
    fn = loss_fn(provider)
    tiny = setup(min(batch, 1024), dim, DTYPES[dtype_name], device)  # load kernels / BLAS buffers first
    fn(tiny[0], tiny[1], tiny[2].exp()).backward()
    del tiny
    image, text, log_scale = setup(batch, dim, DTYPES[dtype_name], device)

    def forward():
        return fn(image, text, log_scale.exp())

    def forward_backward():
        forward().backward()

    peak = benchlib.peak_bytes(forward_backward, device=device)
    row = {"provider": provider, "B": batch, "d": dim, "dtype": dtype_name, "peak_bytes": peak,
           "input_bytes": 2 * image.numel() * image.element_size()}
    if timed:
        with torch.no_grad():
            row["forward"] = benchlib.time_ms(forward, device=device, repeats=repeats)
        row["forward_backward"] = benchlib.time_ms(forward_backward, device=device, repeats=repeats)
    return row


def cyclic_gemms(batch: int, dim: int, dtype: torch.dtype, device: str, equal_weights: bool = False):
    """The GEMMs of the cyclic terms alone, on preallocated operands and outputs: forward [S D]^T S and
    D^T D (3 N d^2 multiply-adds), backward [S D] @ (2d, d) twice (4 N d^2), or with ``equal_weights``
    S @ (d, d) and D @ (d, d) (2 N d^2). No S, D formed, no allocations, no autograd: what the Gram form
    cannot go below with these GEMMs."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator(device="cpu").manual_seed(1)
    p = torch.randn(batch, 2 * dim, generator=g).to(device=device, dtype=acc)
    m = torch.randn(2, 2 * dim, dim, generator=g).to(device=device, dtype=acc)
    grams = torch.empty(3, dim, dim, dtype=acc, device=device)
    grads = torch.empty(2, batch, dim, dtype=acc, device=device)

    def run():
        torch.mm(p.t(), p[:, :dim], out=grams[:2].view(2 * dim, dim))
        torch.mm(p[:, dim:].t(), p[:, dim:], out=grams[2])
        if equal_weights:
            torch.mm(p[:, :dim], m[0, :dim], out=grads[0])
            torch.mm(p[:, dim:], m[1, :dim], out=grads[1])
        else:
            torch.mm(p, m[0], out=grads[0])
            torch.mm(p, m[1], out=grads[1])

    return run


def interleaved(batch: int, dim: int, dtype_name: str, device: str, repeats: int) -> dict:
    """CLIP, the cyclic terms (``cyclic_penalty``, the recipe's equal weights and unequal ones) and the
    cyclic terms' GEMMs alone (for each) timed alternately in one process (the same machine load for all)."""
    clip, cyclic, general = loss_fn("clip"), loss_fn("cyclic"), loss_fn("cyclic_general")
    image, text, log_scale = setup(batch, dim, DTYPES[dtype_name], device)
    gemms = cyclic_gemms(batch, dim, DTYPES[dtype_name], device)
    gemms_equal = cyclic_gemms(batch, dim, DTYPES[dtype_name], device, equal_weights=True)
    steps = (("clip", lambda: clip(image, text, log_scale.exp()).backward()),
             ("cyclic", lambda: cyclic(image, text, log_scale.exp()).backward()), ("gemms_equal", gemms_equal),
             ("cyclic_general", lambda: general(image, text, log_scale.exp()).backward()), ("gemms", gemms))
    samples: dict[str, list[float]] = {name: [] for name, _ in steps}
    for i in range(repeats + 1):  # the first round is a warm-up
        for name, fn in steps:
            benchlib.sync(device)
            t0 = time.perf_counter()
            fn()
            benchlib.sync(device)
            if i:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    ratios = sorted(c / k for c, k in zip(samples["cyclic"], samples["clip"]))
    general_ratios = sorted(c / k for c, k in zip(samples["cyclic_general"], samples["clip"]))
    median = {name: statistics.median(v) for name, v in samples.items()}
    return {"provider": "interleaved", "B": batch, "d": dim, "dtype": dtype_name, "repeats": repeats,
            "weights": {"cyclic": list(WEIGHTS["cyclic"]), "cyclic_general": list(WEIGHTS["cyclic_general"])},
            "clip_forward_backward_ms": samples["clip"],
            # cyclic_penalty with the recipe's equal weights 0.25 / 0.25 (what the trainer calls)
            "cyclic_forward_backward_ms": samples["cyclic"], "cyclic_gemms_ms": samples["gemms_equal"],
            "ratio_of_medians": median["cyclic"] / median["clip"],
            "median_pair_ratio": statistics.median(ratios), "min_pair_ratio": ratios[0], "max_pair_ratio": ratios[-1],
            "gemms_ratio_of_medians": median["gemms_equal"] / median["clip"],
            "cyclic_over_gemms": median["cyclic"] / median["gemms_equal"],
            # cyclic_penalty with unequal weights 0.25 / 0.5 (the general backward, all its GEMMs)
            "general_forward_backward_ms": samples["cyclic_general"], "general_gemms_ms": samples["gemms"],
            "general_ratio_of_medians": median["cyclic_general"] / median["clip"],
            "general_median_pair_ratio": statistics.median(general_ratios),
            "general_min_pair_ratio": general_ratios[0], "general_max_pair_ratio": general_ratios[-1],
            "general_gemms_ratio_of_medians": median["gemms"] / median["clip"],
            "general_over_gemms": median["cyclic_general"] / median["gemms"]}


def plot(results_path: str) -> str:
    """PNG of forward+backward time and peak extra memory vs batch size, from a results JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_path) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if "error" not in r and r["provider"] in PROVIDERS]
    labels = {"clip": "CLIP loss (ops.infonce_loss)", "cyclic": "cyclic terms, d x d Gram form, weights 0.25/0.25",
              "cyclic_general": "cyclic terms, d x d Gram form, weights 0.25/0.5",
              "official": "cyclic terms, official N x N form"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["provider"], r["dtype"]) for r in rows}):
        sel = sorted((r for r in rows if (r["provider"], r["dtype"]) == key), key=lambda r: r["B"])
        label = f"{labels[key[0]]} ({key[1]})"
        timed = [r for r in sel if "forward_backward" in r]
        if timed:
            axes[0].errorbar([r["B"] for r in timed], [r["forward_backward"]["median_ms"] for r in timed],
                             yerr=[[r["forward_backward"]["median_ms"] - r["forward_backward"]["p20_ms"] for r in timed],
                                   [r["forward_backward"]["p80_ms"] - r["forward_backward"]["median_ms"] for r in timed]],
                             marker="o", label=label, capsize=3)
        line = axes[1].plot([r["B"] for r in sel], [r["peak_bytes"] / 2**20 for r in sel], marker="o", label=label)
        extra = [e for e in data["environment"].get("extrapolated", []) if (e["provider"], e["dtype"]) == key]
        if extra and sel:
            axes[1].plot([sel[-1]["B"]] + [e["B"] for e in extra], [sel[-1]["peak_bytes"] / 2**20] + [e["peak_bytes"] / 2**20 for e in extra],
                         linestyle="--", color=line[0].get_color(), marker="x", label=f"{label}, extrapolated")
    for ax, title, unit in ((axes[0], "forward + backward time", "ms (median, p20-p80)"), (axes[1], "peak extra memory", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch B (d = %d)" % rows[0]["d"])
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"CyCLIP regularisers - {data['environment']['device']}", fontsize=10)
    fig.tight_layout()
    out = results_path[: -len(".json")] + ".png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return out


def summarize(rows: list[dict], extrapolated: list[dict]) -> list[str]:
    lines = []
    by_key = {(r["provider"], r["B"], r["dtype"]): r for r in rows if r["provider"] in PROVIDERS}
    for (provider, batch, dtype_name), r in sorted(by_key.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if provider not in ("cyclic", "cyclic_general"):
            continue
        w = "weights %g/%g" % WEIGHTS[provider]
        clip = by_key.get(("clip", batch, dtype_name))
        if clip and "forward_backward" in r and "forward_backward" in clip:
            t = r["forward_backward"]["median_ms"] / clip["forward_backward"]["median_ms"]
            lines.append(f"B={batch} {dtype_name}: cyclic terms ({w}) / CLIP loss, forward+backward time: {100 * t:.1f}% (separate processes)")
        official = by_key.get(("official", batch, dtype_name))
        if provider != "cyclic":
            continue
        if official:
            m = r["peak_bytes"] / max(official["peak_bytes"], 1)
            lines.append(f"B={batch} {dtype_name}: Gram form ({w}) / official N x N form, peak memory: x{m:.4f} "
                         f"({r['peak_bytes'] / 2**20:.0f} MiB vs {official['peak_bytes'] / 2**20:.0f} MiB)")
            if "forward_backward" in official:
                t = r["forward_backward"]["median_ms"] / official["forward_backward"]["median_ms"]
                lines.append(f"B={batch} {dtype_name}: Gram form ({w}) / official N x N form, forward+backward time: x{t:.3f}")
    for r in rows:
        if r["provider"] == "interleaved":
            lines.append(f"B={r['B']} {r['dtype']}: HEADLINE cyclic terms (cyclic_penalty, the recipe's weights 0.25/0.25, as the "
                         f"trainer calls it) / CLIP loss, interleaved in one process: {100 * r['ratio_of_medians']:.1f}% (ratio of "
                         f"medians; per-pair {100 * r['min_pair_ratio']:.1f}-{100 * r['max_pair_ratio']:.1f}%)")
            lines.append(f"B={r['B']} {r['dtype']}: their GEMMs alone (weights 0.25/0.25: 5 N d^2 multiply-adds, preallocated) / "
                         f"CLIP loss, interleaved: {100 * r['gemms_ratio_of_medians']:.1f}%; the cyclic terms take "
                         f"x{r['cyclic_over_gemms']:.2f} their GEMMs' time")
            lines.append(f"B={r['B']} {r['dtype']}: cyclic terms (cyclic_penalty, unequal weights 0.25/0.5: the general backward) / "
                         f"CLIP loss, interleaved in one process: {100 * r['general_ratio_of_medians']:.1f}% (ratio of medians; "
                         f"per-pair {100 * r['general_min_pair_ratio']:.1f}-{100 * r['general_max_pair_ratio']:.1f}%)")
            lines.append(f"B={r['B']} {r['dtype']}: their GEMMs alone (weights 0.25/0.5: 7 N d^2 multiply-adds, preallocated) / "
                         f"CLIP loss, interleaved: {100 * r['general_gemms_ratio_of_medians']:.1f}%; the cyclic terms take "
                         f"x{r['general_over_gemms']:.2f} their GEMMs' time")
    for e in extrapolated:
        lines.append(f"B={e['B']} {e['dtype']}: official N x N form, EXTRAPOLATED peak memory {e['peak_bytes'] / 2**30:.1f} GiB "
                     f"(measured {e['bytes_per_pair']:.2f} bytes/pair at B={e['from_B']})")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--official-max", type=int, default=None, help="largest B for the N x N form's memory (default: 16384 CPU, 32768 GPU)")
    parser.add_argument("--official-time-max", type=int, default=None, help="largest B at which the N x N form is also timed (default 4096 CPU)")
    parser.add_argument("--ratio-batch", type=int, default=16384, help="B of the interleaved CLIP-vs-cyclic timing (0: skip)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats: a smoke run")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--worker", nargs=6, metavar=("PROVIDER", "B", "D", "DTYPE", "REPEATS", "TIMED"), help=argparse.SUPPRESS)
    parser.add_argument("--ratio-worker", nargs=4, metavar=("B", "D", "DTYPE", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        provider, batch, dim, dtype_name, repeats, timed = args.worker
        print(json.dumps(measure(provider, int(batch), int(dim), dtype_name, args.device, int(repeats), timed == "1")))
        return
    if args.ratio_worker:
        batch, dim, dtype_name, repeats = args.ratio_worker
        print(json.dumps(interleaved(int(batch), int(dim), dtype_name, args.device, int(repeats))))
        return

    gpu = args.device.startswith("cuda")
    sizes = args.sizes or ([512, 1024] if args.quick else ([4096, 16384, 32768, 65536] if gpu else [1024, 4096, 16384]))
    dtypes = (args.dtypes or ("fp32,bf16" if gpu else "fp32")).split(",")
    repeats = args.repeats or (3 if args.quick else (20 if gpu else 5))
    official_max = args.official_max or (32768 if gpu else 16384)
    official_time_max = args.official_time_max or (official_max if gpu else 4096)
    ratio_batch = (sizes[-1] if args.quick else args.ratio_batch)
    print(f"device: {benchlib.device_name(args.device)}; sizes: {sizes}; d: {args.dim}; dtypes: {dtypes}; repeats: {repeats}")

    rows = []
    for dtype_name in dtypes:
        for batch in sizes:
            for provider in PROVIDERS:
                if provider == "official" and batch > official_max:
                    continue
                timed = provider != "official" or batch <= official_time_max
                try:
                    row = benchlib.run_isolated(__file__, ["--device", args.device, "--worker", provider, str(batch), str(args.dim),
                                                           dtype_name, str(repeats), "1" if timed else "0"])
                except RuntimeError as exc:
                    print(f"  {provider:9s} B={batch:6d} {dtype_name}: FAILED ({str(exc).splitlines()[-1]})")
                    rows.append({"provider": provider, "B": batch, "d": args.dim, "dtype": dtype_name, "error": str(exc)[-500:]})
                    continue
                rows.append(row)
                fb = row.get("forward_backward")
                timing = f"fwd+bwd {fb['median_ms']:9.1f} ms [{fb['p20_ms']:.1f}, {fb['p80_ms']:.1f}]" if fb else "(memory only)"
                print(f"  {provider:9s} B={batch:6d} {dtype_name}: {timing}  peak {row['peak_bytes'] / 2**20:9.1f} MiB")
        if ratio_batch:
            row = benchlib.run_isolated(__file__, ["--device", args.device, "--ratio-worker", str(ratio_batch), str(args.dim),
                                                   dtype_name, str(repeats)])
            rows.append(row)
            print(f"  interleaved B={ratio_batch} {dtype_name}: cyclic/CLIP {100 * row['ratio_of_medians']:.1f}% (weights 0.25/0.25), "
                  f"{100 * row['general_ratio_of_medians']:.1f}% (weights 0.25/0.5)")

    ok = [r for r in rows if "error" not in r]
    extrapolated = []
    for dtype_name in dtypes:
        measured = sorted((r for r in ok if r["provider"] == "official" and r["dtype"] == dtype_name), key=lambda r: r["B"])
        if measured:
            last = measured[-1]
            per_pair = last["peak_bytes"] / last["B"] ** 2
            for batch in sorted({*sizes, 32768, 65536}):
                if batch > last["B"]:
                    extrapolated.append({"provider": "official", "dtype": dtype_name, "B": batch, "from_B": last["B"],
                                         "bytes_per_pair": per_pair, "peak_bytes": per_pair * batch**2, "extrapolated": True})
    summary = summarize(ok, extrapolated)
    for line in summary:
        print(line)
    out_dir = os.path.join(args.out, "quick") if args.quick else args.out  # smoke runs are not results
    path = os.path.join(out_dir, f"cyclip-{benchlib.device_tag(args.device)}.json")
    env = benchlib.environment(args.device)
    env.update(summary=summary, extrapolated=extrapolated, lambdas={k: list(v) for k, v in WEIGHTS.items()},
               load_average=list(os.getloadavg()), cpu_count=os.cpu_count())
    benchlib.write_results(path, rows, env)
    if any(r["provider"] in PROVIDERS for r in ok):
        plot(path)


if __name__ == "__main__":
    main()
