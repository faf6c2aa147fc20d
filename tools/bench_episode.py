"""ProtoCLIP's episode overhead at the demo settings, split into extraction, k-means, PBT and the rest,
against the training epoch it serves; and k-means at the paper's scale against faiss-cpu.

    python tools/bench_episode.py                      # demo settings: tiny-rn, E = 20000, K = 256, batch 128
    python tools/bench_episode.py --quick              # E = 2000, a few steps (smoke run)
    python tools/bench_episode.py --paper-kmeans-only  # one k-means iteration at E=200k, d=128, K=20000 vs faiss

Goals: everything outside the extraction pass (k-means + PBT + bookkeeping) under 5% of the episode's wall
time, and the extraction pass at or below the cost of a forward pass over the episode's samples (the
streaming loader + the same model in eval mode). Writes benchmarks/results/episode-<machine>.{json,png}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchlib  # noqa: E402


def _data(args) -> dict:
    import json

    from pyprotoclip.data import write_synthetic_dataset

    info_path = os.path.join(args.data, "info.json")
    if os.path.isfile(info_path) and json.load(open(info_path)).get("num_train") == args.samples:
        return json.load(open(info_path))
    print(f"writing {args.samples} synthetic samples to {args.data}", flush=True)
    return write_synthetic_dataset(args.data, args.samples, num_val=0, num_ood=0, progress=False)


def _method(args, shards: str):
    from pyprotoclip.losses import ProtoCLIPMethod
    from pyprotoclip.models import create_model
    from pyprotoclip.train import params as P

    p = P.defaults()
    p.update(method="protoclip", train_data=shards, model=args.model, batch_size=args.batch_size, workers=args.workers,
             episode_size=args.episode_size, num_prototypes=args.num_prototypes, add_projection_head=True, PBT=True,
             kmeans_max_iter=args.kmeans_iter, seed=0)
    method = ProtoCLIPMethod(p)
    base, preprocess_train, _, tokenizer = create_model(args.model, device=args.device, seed=0)
    return p, method, method.build_model(base), preprocess_train, tokenizer


def bench_episode(args) -> list[dict]:
    import contextlib
    import logging

    from pyprotoclip.data import DataConfig, build_loader
    from pyprotoclip.data.episodes import PURPOSE_EXTRACT, EpisodeLoader
    from pyprotoclip.losses import episode as ep
    from pyprotoclip.losses import EpochContext, LoaderRequest
    from pyprotoclip.train.step import train_step
    from pyprotoclip.losses import StepContext

    info = _data(args)
    p, method, model, preprocess, tokenizer = _method(args, info["train_shards"])
    device = torch.device(args.device)
    t0 = time.perf_counter()
    method._dataset()
    t_index = time.perf_counter() - t0
    K, E = args.num_prototypes, method.episode_size()

    # the extraction pass over the episode (random access, training augmentation)
    _, _, samples = method._episode_samples(0, 0, 1, preprocess, purpose=PURPOSE_EXTRACT, epoch=0)
    loader = EpisodeLoader(samples, torch.arange(len(samples)), batch_size=args.batch_size, tokenize=tokenizer,
                           workers=args.workers, drop_last=False)
    t0 = time.perf_counter()
    feats = ep.extract(model, loader, device=device, autocast=contextlib.nullcontext)
    t_extract = time.perf_counter() - t0

    # a plain forward pass over as many samples, streamed as training streams them
    cfg = DataConfig(shards=info["train_shards"], batch_size=args.batch_size, workers=args.workers, num_samples=E, seed=0)
    stream = build_loader(cfg, preprocess=preprocess, tokenize=tokenizer, is_train=True)
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in stream:
            model(batch["image"].to(device), batch["text"].to(device))
    t_forward = time.perf_counter() - t0

    # k-means of both modalities, PBT, and the rest (labels bookkeeping, usage, modality gap)
    image = ep.cluster(feats["image"], K, iters=p["kmeans_max_iter"], redo=1, seed=1)
    text = ep.cluster(feats["text"], K, iters=p["kmeans_max_iter"], redo=1, seed=2)
    t0 = time.perf_counter()
    ep.translate(feats["image"], text.labels, K)
    ep.translate(feats["text"], image.labels, K)
    t_pbt = time.perf_counter() - t0
    t0 = time.perf_counter()
    ep.usage(torch.bincount(image.labels, minlength=K).float())
    ep.usage(torch.bincount(text.labels, minlength=K).float())
    ep.modality_gap(feats["image_emb_sum"], feats["text_emb_sum"], E)
    t_rest = time.perf_counter() - t0

    # the training epoch the episode serves: timed over some steps, extrapolated to E / B steps
    method.state = ep.EpisodeState(episode=0, image_labels=image.labels, text_labels=text.labels,
                                   image_centroids=image.centroids, text_centroids=text.centroids,
                                   image_prototypes=text.centroids, text_prototypes=image.centroids)
    train = method.train_loader(LoaderRequest(epoch=0, start_batch=0, rank=0, world_size=1, preprocess=preprocess,
                                              tokenize=tokenizer, default=lambda: None))
    loss_fn = method.build_loss()
    opt = torch.optim.AdamW(method.param_groups(model, 0.1), lr=1e-4)
    model.train()
    steps = min(args.train_steps, train.num_batches)
    it = iter(train)
    next_batch = next(it)
    t0 = time.perf_counter()
    for s in range(steps):
        batch = next_batch
        train_step(model, loss_fn, [batch], opt, scaler=None, autocast=contextlib.nullcontext, device=device,
                   context=StepContext(step=s, epoch=0, batch={"episode_pos": batch["episode_pos"]}), grad_clip_norm=None)
        if s + 1 < steps:
            next_batch = next(it)
    t_steps = (time.perf_counter() - t0) / steps
    del it
    t_epoch = t_steps * train.num_batches
    episode_wall = t_epoch + t_extract + image.seconds + text.seconds + t_pbt + t_rest
    outside_extraction = image.seconds + text.seconds + t_pbt + t_rest
    row = {
        "kind": "episode", "model": args.model, "episode_size": E, "num_prototypes": K, "batch_size": args.batch_size,
        "workers": args.workers, "kmeans_iter": p["kmeans_max_iter"], "index_s": t_index, "extract_s": t_extract,
        "forward_pass_s": t_forward, "kmeans_image_s": image.seconds, "kmeans_text_s": text.seconds, "pbt_s": t_pbt,
        "rest_s": t_rest, "train_step_s": t_steps, "train_steps_timed": steps,
        "train_epoch_s_extrapolated": t_epoch, "episode_wall_s": episode_wall,
        "outside_extraction_fraction": outside_extraction / episode_wall,
        "extraction_fraction": t_extract / episode_wall, "extraction_vs_forward": t_extract / max(t_forward, 1e-9),
    }
    print(f"index {t_index:.1f}s | extraction {t_extract:.1f}s (forward pass over the same number of samples "
          f"{t_forward:.1f}s: x{row['extraction_vs_forward']:.2f}) | k-means {image.seconds:.2f}s + {text.seconds:.2f}s | "
          f"PBT {t_pbt * 1e3:.1f} ms | rest {t_rest * 1e3:.1f} ms | training epoch {t_epoch:.1f}s "
          f"({steps} steps timed, x{train.num_batches / steps:.0f})", flush=True)
    print(f"outside extraction: {100 * row['outside_extraction_fraction']:.2f}% of the episode's wall time "
          f"(goal < 5%); extraction {100 * row['extraction_fraction']:.1f}%", flush=True)
    return [row]


def bench_paper_kmeans(args) -> list[dict]:
    """One Lloyd iteration at E=200k, d=128, K=20000 (the paper's episode), ours vs faiss-cpu, fp32."""
    from pyprotoclip.cluster import KMeans

    n, d, k = args.paper_points, 128, args.paper_clusters
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(k // 10, d, generator=g), dim=1)
    x = torch.nn.functional.normalize(centres[torch.randint(k // 10, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g), dim=1)
    rows = []
    for backend in ("auto", "faiss"):
        try:
            if backend == "faiss":
                import faiss  # noqa: F401
        except ImportError:
            print("faiss not installed: skipping the faiss-cpu peer")
            continue
        km = KMeans(k, n_iter=1, metric="l2", init="random", tol=None, seed=0, backend=backend)
        t0 = time.perf_counter()
        km.fit(x)
        wall = time.perf_counter() - t0
        it_s = km.iteration_times_[0] if km.iteration_times_ else float("nan")
        rows.append({"kind": "paper_kmeans", "provider": "pyprotoclip" if backend == "auto" else "faiss-cpu", "n": n,
                     "d": d, "k": k, "iteration_s": it_s, "fit_s": wall, "objective": km.inertia_})
        print(f"k-means n={n} d={d} k={k}, one iteration: {rows[-1]['provider']} {it_s:.2f}s (fit incl. init and final "
              f"assignment {wall:.2f}s, objective {km.inertia_:.5g})", flush=True)
    if len(rows) == 2:
        rows[0]["ratio_vs_faiss"] = rows[0]["iteration_s"] / rows[1]["iteration_s"]
        print(f"pyprotoclip / faiss-cpu per iteration: x{rows[0]['ratio_vs_faiss']:.2f}")
    return rows


def plot(path: str, rows: list[dict], env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episode = [r for r in rows if r["kind"] == "episode"]
    paper = [r for r in rows if r["kind"] == "paper_kmeans"]
    fig, axes = plt.subplots(1, 2 if paper else 1, figsize=(11 if paper else 7, 3.2), squeeze=False)
    if episode:
        r, ax = episode[0], axes[0][0]
        parts = [("training epoch (extrapolated)", r["train_epoch_s_extrapolated"]), ("extraction", r["extract_s"]),
                 ("k-means", r["kmeans_image_s"] + r["kmeans_text_s"]), ("PBT + rest", r["pbt_s"] + r["rest_s"])]
        left = 0.0
        for (label, value), colour in zip(parts, ("#4c72b0", "#dd8452", "#55a868", "#c44e52")):
            ax.barh([0], [value], left=left, color=colour, label=f"{label} {value:.1f}s")
            left += value
        ax.barh([1], [r["forward_pass_s"]], color="#8172b3", label=f"plain forward pass {r['forward_pass_s']:.1f}s")
        ax.set_yticks([0, 1], ["one episode", "forward pass\n(same samples)"])
        ax.set_xlabel("seconds")
        ax.set_title(f"E={r['episode_size']}, K={r['num_prototypes']}, {r['model']}: outside extraction "
                     f"{100 * r['outside_extraction_fraction']:.1f}%", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    if paper:
        ax = axes[0][-1]
        ax.bar([r["provider"] for r in paper], [r["iteration_s"] for r in paper], color=["#4c72b0", "#999999"][: len(paper)])
        ax.set_ylabel("seconds per iteration")
        ax.set_title(f"k-means n={paper[0]['n']}, d=128, K={paper[0]['k']}", fontsize=9)
    fig.suptitle(env["device"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join("demo", "data"))
    ap.add_argument("--samples", type=int, default=20000, help="Synthetic training samples (when --data has none).")
    ap.add_argument("--episode-size", type=int, default=20000)
    ap.add_argument("--num-prototypes", type=int, default=256)
    ap.add_argument("--kmeans-iter", type=int, default=20)
    ap.add_argument("--model", default="tiny-rn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=20, help="Training steps timed (the epoch is extrapolated).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--paper-points", type=int, default=200_000)
    ap.add_argument("--paper-clusters", type=int, default=20_000)
    ap.add_argument("--paper-kmeans-only", action="store_true")
    ap.add_argument("--skip-paper-kmeans", action="store_true")
    ap.add_argument("--quick", action="store_true", help="E = 2000, K = 64, 5 steps, small paper k-means.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging_quiet()
    out_dir = os.path.join("benchmarks", "results")
    if args.quick:
        args.samples = args.episode_size = 2000
        args.num_prototypes, args.train_steps, args.paper_points, args.paper_clusters = 64, 5, 20_000, 2_000
        args.data = os.path.join("benchmarks", "results", "quick", "episode-data")
        out_dir = os.path.join(out_dir, "quick")
    rows = []
    if not args.paper_kmeans_only:
        rows += bench_episode(args)
    if not args.skip_paper_kmeans:
        rows += bench_paper_kmeans(args)
    env = benchlib.environment(args.device)
    stem = os.path.join(out_dir, f"episode-{benchlib.device_tag(args.device)}")
    benchlib.write_results(stem + ".json", rows, env)
    plot(stem + ".png", rows, env)


def logging_quiet() -> None:
    import logging

    logging.getLogger("pyprotoclip").setLevel(logging.WARNING)


if __name__ == "__main__":
    main()
