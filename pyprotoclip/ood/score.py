"""``pyprotoclip ood score | eval``: features of any pyprotoclip checkpoint, OOD scores, metrics and plots.

Checkpoints: an ``ood train`` checkpoint (penultimate backbone features, its classifier for MSP when trained
with cross-entropy) or a ``pyprotoclip train`` checkpoint of any method (CLIP, ProtoCLIP, ...; the image
tower's embedding, and its text tower for MCM), or a plain open_clip state dict with ``--model``.
Images go through the evaluation transform (the official one for ``ood train`` networks: Resize((s, s)) ->
CenterCrop -> Normalize; the architecture's own for image-text models) for the training features too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zipfile
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pyprotoclip.checkpoint import load_checkpoint
from pyprotoclip.eval.ood_metrics import ood_metrics
from pyprotoclip.ood.models import build_model, eval_transform, no_text
from pyprotoclip.ood.scores import KNN, SCORES, LinearHeadMSP, Mahalanobis, mcm, msp_from_logits
from pyprotoclip.ood.train import FORMAT


@dataclasses.dataclass
class ScoringModel:
    """What scoring needs from a checkpoint. ``encode``: images (B, 3, H, W) -> features (B, D);
    ``logits``: the trained classifier, if any; ``model``/``tokenizer``: the image-text model (MCM)."""

    kind: str  # "ood" | "image-text"
    encode: Callable[[torch.Tensor], torch.Tensor]
    preprocess: Callable
    meta: dict[str, Any]
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None
    model: Any = None
    tokenizer: Any = None


def load_scoring_model(path: str, *, model_name: str | None = None, device: str | torch.device = "cpu") -> ScoringModel:
    """The checkpoint at ``path`` ready for feature extraction, in eval mode on ``device``."""
    state = load_checkpoint(path)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        cfg = state["model_cfg"]
        net = build_model(cfg)
        net.load_state_dict(state["state_dict"])
        net.to(device).eval()
        meta = {k: state.get(k) for k in ("step", "epoch", "model", "name", "method")}
        return ScoringModel("ood", net.encode, eval_transform(cfg["image_size"], cfg["mean"], cfg["std"]), meta,
                            logits=net.logits if net.fc is not None else None)
    del state
    from pyprotoclip.eval.evaluate import load_model_from_checkpoint

    model, preprocess_val, tokenizer, meta = load_model_from_checkpoint(path, model_name, device)
    return ScoringModel("image-text", lambda x: model.encode_image(x, normalize=False), preprocess_val, meta,
                        model=model, tokenizer=tokenizer)


@torch.no_grad()
def extract(sm: ScoringModel, shards: str, *, batch_size: int = 256, workers: int = 2, num_samples: int | None = None,
            device: str | torch.device = "cpu", data: Any = None, flag: str = "data") -> dict[str, Any]:
    """{"features" (N, D) float32, "labels" (N,) int64 (-1 without .cls), "keys", "logits" (N, C) or None} over
    every sample of ``shards`` (evaluation order: each shard once)."""
    if data is None:
        import pyprotoclip.data as data
    cfg = data.DataConfig(shards=shards, batch_size=batch_size, workers=workers, num_samples=num_samples, drop_last=False,
                          flag=flag)
    loader = data.build_loader(cfg, preprocess=sm.preprocess, tokenize=no_text, is_train=False)
    feats, logits, labels, keys = [], [], [], []
    n = 0
    for batch in loader:
        x = batch["image"].to(device)
        f = sm.encode(x)
        feats.append(f.float().cpu())
        if sm.logits is not None:
            logits.append(sm.logits(x).float().cpu())
        labels.append(batch["label"].cpu())
        keys.extend(batch.get("key", []))
        n += x.shape[0]
        if num_samples is not None and n >= num_samples:
            break
    if not feats:
        raise ValueError(f"data: {shards!r} yielded no samples")
    out = {"features": torch.cat(feats), "labels": torch.cat(labels).long(), "keys": keys,
           "logits": torch.cat(logits) if logits else None}
    if num_samples is not None:
        out["features"], out["labels"], out["keys"] = out["features"][:num_samples], out["labels"][:num_samples], keys[:num_samples]
        if out["logits"] is not None:
            out["logits"] = out["logits"][:num_samples]
    return out


def _read_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{what}: {path!r} is empty")
    return lines


def build_scorer(name: str, sm: ScoringModel, train: dict[str, Any] | None, *, mahalanobis_form: str = "official",
                 knn_k: int = 50, knn_backend: str = "auto", mcm_temperature: float = 1.0,
                 classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                 device: str | torch.device = "cpu") -> tuple[Callable[[dict[str, Any]], np.ndarray], dict[str, Any]]:
    """(scorer: extracted features -> (N,) scores, description) for score ``name``."""
    if name not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {name!r}")
    if name in ("mahalanobis", "knn") or (name == "msp" and sm.logits is None):
        if train is None:
            raise ValueError(f"train-data: the {name} score is fitted on training features; pass --train-data")
    if name == "mahalanobis":
        s = Mahalanobis(train["features"], form=mahalanobis_form)
        return (lambda d: s(d["features"])), {"mahalanobis_form": mahalanobis_form}
    if name == "knn":
        s = KNN(train["features"], k=knn_k, backend=knn_backend)
        return (lambda d: s(d["features"])), {"knn_k": knn_k, "knn_backend": s.backend}
    if name == "msp":
        if sm.logits is not None:
            return (lambda d: msp_from_logits(d["logits"])), {"msp_head": "trained"}
        s = LinearHeadMSP(train["features"], train["labels"])
        return (lambda d: s(d["features"])), {"msp_head": "fitted logistic regression"}
    # mcm
    if sm.kind != "image-text":
        raise ValueError("score: mcm needs an image-text checkpoint (CLIP-style, with a text tower)")
    if not classnames or not templates:
        raise ValueError("classnames/templates: mcm needs the in-distribution class names and prompt templates")
    from pyprotoclip.eval.zeroshot import build_classifier

    with torch.no_grad():
        w = build_classifier(lambda t: sm.model.encode_text(t), sm.tokenizer, classnames, templates, device=device).cpu()
    return (lambda d: mcm(d["features"], w, temperature=mcm_temperature)), {"mcm_temperature": mcm_temperature,
                                                                           "num_classes": len(classnames)}


def default_out_dir(checkpoint: str) -> str:
    ckpt_dir = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ckpt_dir


def _set_name(spec: str) -> str:
    """A readable name for a shard spec: its directory name (``.../ood/{00000..00001}.tar`` -> ``ood``)."""
    first = spec.split("::")[0]
    return os.path.basename(os.path.dirname(os.path.abspath(first))) or first


def zeroshot_files(id_data: str | None, classnames_file: str | None, templates_file: str | None):
    if (classnames_file is None) != (templates_file is None):
        raise ValueError("classnames/templates: give both --classnames and --templates, or neither")
    if classnames_file:
        return _read_lines(classnames_file, "classnames"), _read_lines(templates_file, "templates")
    if id_data is None:
        return None, None
    from pyprotoclip.data import read_zeroshot_files

    try:
        return read_zeroshot_files(id_data)
    except FileNotFoundError:
        return None, None


def plot_ood(path: str, per_score: dict[str, dict[str, Any]], title: str) -> None:
    """One row per score: ID vs OOD score histograms, and the ROC curves (ID positive) with AUROC and the FPR95 point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    rows = len(per_score)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.6 * rows), squeeze=False)
    for row, (score, d) in enumerate(per_score.items()):
        ax_h, ax_r = axes[row]
        id_s = d["id"]
        allv = np.concatenate([id_s] + list(d["ood"].values()))
        lo, hi = np.percentile(allv, 0.5), np.percentile(allv, 99.5)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
        ax_h.hist(np.clip(id_s, lo, hi), bins=bins, density=True, alpha=0.5, label=f"ID ({id_s.size})")
        for name, o in d["ood"].items():
            ax_h.hist(np.clip(o, lo, hi), bins=bins, density=True, alpha=0.5, label=f"{name} ({o.size})")
        ax_h.axvline(np.percentile(id_s, 5), color="k", ls="--", lw=1, label="95% TPR threshold")
        ax_h.set_title(f"{score}: score histograms (higher = more ID)")
        ax_h.set_xlabel("score")
        ax_h.legend(fontsize=8)
        for name, o in d["ood"].items():
            y = np.r_[np.ones(id_s.size), np.zeros(o.size)]
            fpr, tpr, _ = roc_curve(y, np.r_[id_s, o])
            m = d["metrics"][name]
            ax_r.plot(fpr, tpr, label=f"{name}: AUROC {100 * m['auroc']:.2f}, FPR95 {100 * m['fpr95']:.2f}")
            ax_r.plot([m["fpr95"]], [0.95], "o", ms=4, color=ax_r.lines[-1].get_color())
        ax_r.plot([0, 1], [0, 1], color="0.7", lw=1)
        ax_r.set_xlabel("false positive rate (OOD accepted)")
        ax_r.set_ylabel("true positive rate (ID accepted)")
        ax_r.set_title(f"{score}: ROC")
        ax_r.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_scores(per_score: dict[str, dict[str, Any]], *, aupr: str = "average_precision") -> None:
    """Fill ``per_score[s]["metrics"][ood_name]`` (and "average", the mean over OOD sets, as the official code)."""
    for d in per_score.values():
        metrics = {name: ood_metrics(d["id"], o, aupr=aupr) for name, o in d["ood"].items()}
        if len(metrics) > 1:
            keys = next(iter(metrics.values())).keys()
            metrics["average"] = {k: float(np.mean([m[k] for m in metrics.values()])) for k in keys}
        d["metrics"] = metrics


def run_eval(checkpoint: str, *, id_data: str, ood_data: Sequence[str], train_data: str | None, scores: Sequence[str],
             ood_names: Sequence[str] | None = None, model_name: str | None = None, train_num_samples: int | None = None,
             batch_size: int = 256, workers: int = 2, device: str = "cpu", aupr: str = "average_precision",
             out_dir: str | None = None, plot: bool = True, classnames_file: str | None = None,
             templates_file: str | None = None, data: Any = None, **scorer_kwargs: Any) -> dict[str, Any]:
    """Score the ID set and every OOD set with each score; append rows to results.jsonl, draw the PNG.

    Returns {"metrics": {score: {ood_name: metrics}}, "results": path, "plot": path}.
    """
    t0 = time.time()
    if not ood_data:
        raise ValueError("ood-data: expected at least one OOD shard spec")
    names = list(ood_names) if ood_names else [_set_name(s) for s in ood_data]
    if len(names) != len(ood_data):
        raise ValueError(f"ood-name: expected one name per --ood-data ({len(ood_data)}), got {len(names)}")
    if len(set(names)) != len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    sm = load_scoring_model(checkpoint, model_name=model_name, device=device)
    kw = dict(batch_size=batch_size, workers=workers, device=device, data=data)
    needs_train = any(s in ("mahalanobis", "knn") or (s == "msp" and sm.logits is None) for s in scores)
    train = extract(sm, train_data, num_samples=train_num_samples, flag="train-data", **kw) if (train_data and needs_train) else None
    id_feats = extract(sm, id_data, flag="id-data", **kw)
    ood_feats = {n: extract(sm, s, flag="ood-data", **kw) for n, s in zip(names, ood_data)}
    classnames, templates = zeroshot_files(id_data, classnames_file, templates_file) if "mcm" in scores else (None, None)
    per_score: dict[str, dict[str, Any]] = {}
    for s in scores:
        scorer, desc = build_scorer(s, sm, train, classnames=classnames, templates=templates, device=device, **scorer_kwargs)
        per_score[s] = {"id": scorer(id_feats), "ood": {n: scorer(f) for n, f in ood_feats.items()}, "desc": desc}
    evaluate_scores(per_score, aupr=aupr)
    out_dir = out_dir or default_out_dir(checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "results.jsonl")
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    base = {"type": "ood_eval", "checkpoint": os.path.abspath(checkpoint), "id_data": id_data,
            "train_data": train_data, **{f"ckpt_{k}": v for k, v in sm.meta.items() if v is not None}, "aupr": aupr,
            "n_id": int(id_feats["features"].shape[0]), "n_train": None if train is None else int(train["features"].shape[0])}
    with open(results_path, "a") as f:
        for s, d in per_score.items():
            for name, m in d["metrics"].items():
                n_ood = int(ood_feats[name]["features"].shape[0]) if name in ood_feats else None
                f.write(json.dumps({**base, "score": s, **d["desc"], "ood": name, "n_ood": n_ood, **m}) + "\n")
    out = {"metrics": {s: d["metrics"] for s, d in per_score.items()}, "results": results_path,
           "eval_seconds": time.time() - t0}
    if plot:
        png = os.path.join(out_dir, f"ood-{stem}.png")
        plot_ood(png, per_score, f"{os.path.abspath(checkpoint)}  ID: {_set_name(id_data)}")
        out["plot"] = png
    return out


SCORE_FILE_FORMATS = "an .npz written by `ood score`, a .npy, or a text file of numbers"


def read_score_file(path: str, flag: str = "scores") -> tuple[np.ndarray, str | None]:
    """(scores, the score's name or None) from an ``ood score`` .npz (keys "scores", "score") or a .npy / text
    file of numbers; a file that is none of these is a one-line ValueError naming ``flag`` and the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: no such file {path!r}")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                if "scores" not in z:
                    raise KeyError("scores")
                name = str(z["score"]) if "score" in z else None
                return np.asarray(z["scores"], dtype=np.float64), name
        if path.endswith(".npy"):
            return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64).ravel(), None
        return np.loadtxt(path, dtype=np.float64, ndmin=1), None
    except KeyError:
        raise ValueError(f"{flag}: {path!r} has no 'scores' array; expected {SCORE_FILE_FORMATS}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{flag}: {path!r} is not a score file ({type(exc).__name__}); expected "
                         f"{SCORE_FILE_FORMATS}") from None


def read_scores(path: str) -> np.ndarray:
    """Scores from an ``ood score`` .npz (key "scores") or a .npy / text file of numbers."""
    return read_score_file(path)[0]


def eval_score_files(id_scores: str, ood_scores: Sequence[str], *, ood_names: Sequence[str] | None = None,
                     aupr: str = "average_precision", out_dir: str = ".", plot: bool = True, label: str | None = None) -> dict[str, Any]:
    """Metrics (and the plot) of precomputed scores: one ID file, one or more OOD files.

    label: the score's name in the table and results.jsonl; default the name the .npz files store (``ood score``
    writes it), else "scores". An ID and an OOD file that store different score names are refused.
    """
    names = list(ood_names) if ood_names else [os.path.splitext(os.path.basename(p))[0] for p in ood_scores]
    if len(names) != len(ood_scores):
        raise ValueError(f"ood-name: expected one name per OOD scores file ({len(ood_scores)}), got {len(names)}")
    id_arr, id_name = read_score_file(id_scores, "id-scores")
    ood = {}
    stored, stored_path = id_name, id_scores
    for n, path in zip(names, ood_scores):
        ood[n], ood_name = read_score_file(path, "ood-scores")
        if ood_name is not None and stored is not None and ood_name != stored:
            raise ValueError(f"id-scores/ood-scores: {stored_path!r} holds {stored!r} scores but {path!r} holds "
                             f"{ood_name!r}; give --id-scores and --ood-scores of the same score")
        if stored is None:
            stored, stored_path = ood_name, path
    label = label or stored or "scores"
    per_score = {label: {"id": id_arr, "ood": ood, "desc": {}}}
    evaluate_scores(per_score, aupr=aupr)
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "results.jsonl")
    with open(results_path, "a") as f:
        for name, m in per_score[label]["metrics"].items():
            f.write(json.dumps({"type": "ood_eval", "id_scores": os.path.abspath(id_scores), "score": label, "ood": name,
                                "aupr": aupr, "n_id": int(per_score[label]["id"].size),
                                "n_ood": int(per_score[label]["ood"][name].size) if name in per_score[label]["ood"] else None,
                                **m}) + "\n")
    out = {"metrics": {label: per_score[label]["metrics"]}, "results": results_path}
    if plot:
        png = os.path.join(out_dir, f"ood-{os.path.splitext(os.path.basename(id_scores))[0]}.png")
        plot_ood(png, per_score, f"ID scores: {os.path.abspath(id_scores)}")
        out["plot"] = png
    return out


def format_table(metrics: dict[str, dict[str, dict[str, float]]]) -> str:
    """score | OOD set | FPR95 | AUROC | AUPR-in | AUPR-out (percent)."""
    lines = [f"{'score':<12} {'OOD set':<14} {'FPR95':>7} {'AUROC':>7} {'AUPR-in':>8} {'AUPR-out':>8}"]
    for s, per in metrics.items():
        for name, m in per.items():
            lines.append(f"{s:<12} {name:<14} {100 * m['fpr95']:7.2f} {100 * m['auroc']:7.2f} {100 * m['aupr_in']:8.2f} "
                         f"{100 * m['aupr_out']:8.2f}")
    return "\n".join(lines)
