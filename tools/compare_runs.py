"""Side-by-side results of training runs: the last `pyprotoclip eval` row of each run as a table, and the
validation curves (zero-shot top-1, retrieval mean recall) against samples seen, as a PNG.

    python tools/compare_runs.py demo/logs/demo-clip demo/logs/demo-protoclip --out demo/compare.png
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyprotoclip.eval.plot import read_results  # noqa: E402

ROWS = (
    ("zero-shot top-1", "zeroshot_top1", "%"),
    ("zero-shot top-5", "zeroshot_top5", "%"),
    ("linear probe top-1", "linear_probe_top1", "%"),
    ("retrieval mean recall", "mean_recall", "%"),
    ("image->text R@1", "image_to_text_R@1", "%"),
    ("text->image R@1", "text_to_image_R@1", "%"),
    ("clustering ARI", "clustering_ari", "%"),
    ("clustering AMI", "clustering_ami", "%"),
    ("cross-modal consistency @1", "crossmodal_consistency@1", "%"),
    ("in-modal consistency @1", "inmodal_consistency@1", "%"),
    ("modality gap", "modality_gap", ""),
)


def table(runs: dict[str, list[dict]]) -> str:
    finals = {name: next((r for r in reversed(rows) if r.get("type") == "eval"), {}) for name, rows in runs.items()}
    summaries = {name: next((r for r in reversed(rows) if r.get("type") == "summary"), {}) for name, rows in runs.items()}
    width = max(len(label) for label, _, _ in ROWS)
    cols = list(runs)
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{c:>12}" for c in cols), "-" * (width + 14 * len(cols))]
    for label, key, unit in ROWS:
        if not any(key in finals[c] for c in cols):
            continue
        cells = []
        for c in cols:
            v = finals[c].get(key)
            cells.append(f"{'-':>12}" if v is None else (f"{100 * v:11.1f}%" if unit == "%" else f"{v:12.3f}"))
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    for label, key in (("samples seen", "samples"), ("training wall s", "wall_s"), ("samples/s", "samples_per_s")):
        cells = []
        for c in cols:
            v = _samples(runs[c]) if key == "samples" else summaries[c].get(key)
            cells.append(f"{'-':>12}" if v is None else f"{v:12.0f}")
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _samples(rows: list[dict]) -> int | None:
    train = [r for r in rows if r.get("type") == "train"]
    return train[-1]["samples"] if train else None


def curves(path: str, runs: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in runs.items():
        val = [r for r in rows if r.get("type") == "val"]
        train = {r["step"]: r["samples"] for r in rows if r.get("type") == "train"}
        xs = [train.get(r["step"], r["step"]) for r in val]
        for ax, key in zip(axes, ("zeroshot_top1", "mean_recall")):
            pts = [(x, 100 * r[key]) for x, r in zip(xs, val) if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
    for ax, title in zip(axes, ("zero-shot top-1 (%)", "retrieval mean recall (%)")):
        ax.set_xlabel("training samples seen")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="Run directories (<logs>/<name>).")
    ap.add_argument("--out", default=None, help="PNG of the validation curves (default: none).")
    args = ap.parse_args()
    runs = {os.path.basename(os.path.normpath(r)): read_results(r) for r in args.runs}
    missing = [name for name, rows in runs.items() if not rows]
    if missing:
        sys.exit(f"no results.jsonl in: {', '.join(missing)}")
    print(table(runs))
    if args.out:
        curves(args.out, runs)
        print(f"curves: {args.out}")


if __name__ == "__main__":
    main()
