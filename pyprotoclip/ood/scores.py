"""OOD scores from features (higher = more in-distribution): Mahalanobis / SSD+ (the PALM code's scorer), KNN
distance, maximum softmax probability (MSP) and CLIP's maximum concept matching (MCM).

Every scorer L2-normalises the features first, as the official ``util/evaluations/mahalanobis.py`` does
(``x / (|x| + 1e-10)``); fitted scorers are fitted on the training set's features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

SCORES = ("mahalanobis", "knn", "msp", "mcm")
MAHALANOBIS_FORMS = ("official", "corrected")
KNN_BACKENDS = ("auto", "faiss", "torch")


def _matrix(name: str, x: Any, width: int | None = None) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (n, d) feature matrix, got shape {arr.shape}")
    if width is not None and arr.shape[1] != width:
        raise ValueError(f"{name}: expected feature size {width} (as the training features), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected finite features, found NaN/Inf")
    return arr


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """x / (|x| + 1e-10) row by row (the official normaliser)."""
    return x / (np.linalg.norm(x, ord=2, axis=-1, keepdims=True) + 1e-10)


class Mahalanobis:
    """SSD+ (official): one class-agnostic Gaussian over the standardised, normalised training features.

    x~ = (x^ - mu) / (sigma + 1e-10) with the training mean mu and std sigma of x^ = normalise(x);
    Sigma = cov(x~_train) (divided by n); score(x) = -z^T pinv(Sigma) z with
      form="official":  z = x~ - mu   (the official code subtracts the mean a second time, from the
                                       already standardised features: its ``maha_score`` uses ``X - mean_feat``)
      form="corrected": z = x~        (the distance to the standardised training mean, 0)
    In float64 (the official code keeps the features in float32 and the covariance in float64).
    """

    def __init__(self, train_features: Any, *, form: str = "official") -> None:
        if form not in MAHALANOBIS_FORMS:
            raise ValueError(f"mahalanobis-form: expected one of {MAHALANOBIS_FORMS}, got {form!r}")
        f = l2_normalise(_matrix("train_features", train_features))
        self.form, self.width = form, f.shape[1]
        self.mean, self.std = f.mean(0), f.std(0)
        self.inv_sigma = np.linalg.pinv(np.cov(self._standardise(f).T, bias=True).reshape(self.width, self.width))

    def _standardise(self, f: np.ndarray) -> np.ndarray:
        return (f - self.mean) / (self.std + 1e-10)

    def __call__(self, features: Any) -> np.ndarray:
        z = self._standardise(l2_normalise(_matrix("features", features, self.width)))
        if self.form == "official":
            z = z - self.mean
        return -np.sum(z * (self.inv_sigma @ z.T).T, axis=-1)


def _faiss():
    try:
        import faiss  # noqa: F401

        return faiss
    except ImportError:
        return None


class KNN:
    """Negative Euclidean distance to the k-th nearest normalised training feature (Sun et al., ICML 2022).

    backend "faiss" (an exact IndexFlatL2; "auto" uses it when faiss is installed) or "torch" (exact, in
    blocks of at most ``block`` rows and 2^25 distances). The distances are those of the float32 normalised features.
    """

    def __init__(self, train_features: Any, *, k: int = 50, backend: str = "auto", block: int = 4096) -> None:
        if backend not in KNN_BACKENDS:
            raise ValueError(f"knn-backend: expected one of {KNN_BACKENDS}, got {backend!r}")
        train = l2_normalise(_matrix("train_features", train_features)).astype(np.float32)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= train.shape[0]:
            raise ValueError(f"knn-k: expected an int in [1, {train.shape[0]}] (the training samples), got {k!r}")
        faiss = _faiss() if backend in ("auto", "faiss") else None
        if backend == "faiss" and faiss is None:
            raise ValueError("knn-backend: faiss is not installed (pip install faiss-cpu), use --knn-backend torch")
        self.k, self.width, self.block = k, train.shape[1], block
        self.backend = "faiss" if faiss is not None else "torch"
        if self.backend == "faiss":
            self.index = faiss.IndexFlatL2(self.width)
            self.index.add(np.ascontiguousarray(train))
        else:
            self.train = torch.from_numpy(train)

    def __call__(self, features: Any) -> np.ndarray:
        x = np.ascontiguousarray(l2_normalise(_matrix("features", features, self.width)).astype(np.float32))
        if self.backend == "faiss":
            d2, _ = self.index.search(x, self.k)
            kth = d2[:, -1].astype(np.float64)
        else:
            t = self.train
            tn = (t * t).sum(1)
            rows = max(1, min(self.block, (1 << 25) // t.shape[0]))  # a (rows, n_train) block stays <= 128 MiB
            out = []
            for i in range(0, x.shape[0], rows):
                xb = torch.from_numpy(x[i : i + rows])
                d2 = (xb * xb).sum(1, keepdim=True) - 2.0 * (xb @ t.t()) + tn
                out.append(torch.topk(d2, self.k, dim=1, largest=False).values[:, -1])
            kth = torch.cat(out).double().numpy()
        return -np.sqrt(np.maximum(kth, 0.0))


def msp_from_logits(logits: Any) -> np.ndarray:
    """Maximum softmax probability of classifier logits (n, C) (Hendrycks & Gimpel, 2017)."""
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float64) if not isinstance(logits, torch.Tensor) else logits)
    return torch.softmax(logits.double(), dim=1).max(dim=1).values.numpy()


class LinearHeadMSP:
    """MSP of a linear head fitted on the training features: logistic regression (scikit-learn, lbfgs,
    multinomial) on the standardised normalised features, as a classifier for networks that have none."""

    def __init__(self, train_features: Any, labels: Any, *, C: float = 1.0, max_iter: int = 1000, seed: int = 0) -> None:
        from sklearn.linear_model import LogisticRegression

        f = l2_normalise(_matrix("train_features", train_features))
        y = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
        if y.shape != (f.shape[0],):
            raise ValueError(f"labels: expected shape ({f.shape[0]},) to match the training features, got {y.shape}")
        if (y < 0).any():
            raise ValueError("labels: the training data has samples without a class label (-1); MSP needs labels")
        if np.unique(y).size < 2:
            raise ValueError("labels: MSP needs at least two classes in the training data")
        self.width = f.shape[1]
        self.mean, self.std = f.mean(0), f.std(0) + 1e-10
        self.clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit((f - self.mean) / self.std, y)

    def __call__(self, features: Any) -> np.ndarray:
        f = l2_normalise(_matrix("features", features, self.width))
        return self.clf.predict_proba((f - self.mean) / self.std).max(axis=1)


def mcm(features: Any, classifier: Any, *, temperature: float = 1.0) -> np.ndarray:
    """Maximum concept matching (Ming et al., NeurIPS 2022): max_c softmax_c(cos(x, t_c) / T).

    features: (n, D) image features; classifier: (D, C) normalised class-prompt embeddings
    (:func:`pyprotoclip.eval.zeroshot.build_classifier`); T = 1 as the MCM paper.
    """
    if not temperature > 0:
        raise ValueError(f"mcm-temperature: expected a value > 0, got {temperature!r}")
    w = _matrix("classifier", classifier)
    f = l2_normalise(_matrix("features", features, w.shape[0]))
    return torch.softmax(torch.from_numpy(f @ w) / temperature, dim=1).max(dim=1).values.numpy()
