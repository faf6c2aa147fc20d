"""PNG summary of an evaluation: zero-shot confusion matrix and the run's training curves."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def read_results(run_dir: str) -> list[dict[str, Any]]:
    """Rows of ``<run_dir>/results.jsonl`` (empty when absent; malformed lines are skipped)."""
    path = os.path.join(run_dir, "results.jsonl")
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def summary_plot(
    path: str,
    *,
    confusion: np.ndarray | None,
    classnames: list[str],
    run_dir: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """Draw the zero-shot confusion matrix (rows: true class, normalised; a note when ``confusion`` is
    None, e.g. data without labels) and, when the run's results.jsonl has training rows, the loss /
    logit-scale and validation curves. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_results(run_dir) if run_dir else []
    train = [r for r in rows if r.get("type") == "train"]
    val = [r for r in rows if r.get("type") == "val"]
    panels = 1 + bool(train) + bool(val)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.8), squeeze=False)
    axes = axes[0]

    ax = axes[0]
    if confusion is None:
        ax.axis("off")
        why = "; ".join((metrics or {}).get("skipped") or ["not run"])
        ax.text(0.5, 0.5, f"zero-shot skipped:\n{why}", ha="center", va="center", wrap=True, transform=ax.transAxes)
    else:
        cm = confusion.astype(float)
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
        ticks = np.arange(len(classnames))
        small = max(4, min(9, int(180 / max(len(classnames), 1))))
        ax.set_xticks(ticks, classnames, rotation=90, fontsize=small)
        ax.set_yticks(ticks, classnames, fontsize=small)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        title = "zero-shot confusion"
        if metrics and "zeroshot_top1" in metrics:
            title += f" (top-1 {100 * metrics['zeroshot_top1']:.1f}%)"
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)

    i = 1
    if train:
        ax = axes[i]
        i += 1
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["contrastive_loss"] for r in train], label="train loss", color="C0")
        if val:
            ax.plot([r["step"] for r in val], [r.get("val_loss", np.nan) for r in val], "o-", label="val loss", color="C1")
        ax.set_xlabel("step")
        ax.set_ylabel("contrastive loss")
        ax2 = ax.twinx()
        ax2.plot(steps, [r["scale"] for r in train], color="C2", alpha=0.6, label="logit scale")
        ax2.set_ylabel("logit scale")
        handles, labels = ax.get_legend_handles_labels()
        handles2, labels2 = ax2.get_legend_handles_labels()
        ax2.legend(handles + handles2, labels + labels2, loc="upper right")  # one legend for both; on the top axes
        ax.set_title("training")
    if val:
        ax = axes[i]
        steps = [r["step"] for r in val]
        for key, label in (("zeroshot_top1", "zero-shot top-1"), ("mean_recall", "retrieval mean recall"),
                           ("image_to_text_R@1", "image->text R@1")):
            pts = [(s, r[key]) for s, r in zip(steps, val) if key in r]
            if pts:
                ax.plot(*zip(*pts), "o-", label=label)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.legend()
        ax.set_title("validation")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long class names: keep the rotated ticks and "predicted"
    plt.close(fig)
    return path
