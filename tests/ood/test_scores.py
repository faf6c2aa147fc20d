"""OOD scores against direct formulas: Mahalanobis (official and corrected), KNN (faiss and torch), MSP, MCM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyprotoclip.ood.scores import KNN, LinearHeadMSP, Mahalanobis, mcm, msp_from_logits


def _features(n, d, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) + shift


def _official_ssd(ftrain, x, form):
    """util/evaluations/mahalanobis.py, one sample at a time."""
    norm = lambda v: v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-10)  # noqa: E731
    ftrain = norm(ftrain)
    mean, std = ftrain.mean(0), ftrain.std(0)
    t = (ftrain - mean) / (std + 1e-10)
    cov = (t - t.mean(0)).T @ (t - t.mean(0)) / t.shape[0]  # np.cov(bias=True)
    inv = np.linalg.pinv(cov)
    out = []
    for row in norm(x):
        z = (row - mean) / (std + 1e-10)
        if form == "official":
            z = z - mean
        out.append(-(z @ inv @ z))
    return np.array(out)


@pytest.mark.parametrize("form", ["official", "corrected"])
def test_mahalanobis_matches_the_direct_formula(form):
    train, test = _features(200, 6), _features(30, 6, seed=1, shift=0.3)
    got = Mahalanobis(train, form=form)(test)
    np.testing.assert_allclose(got, _official_ssd(train, test, form), rtol=1e-10, atol=1e-10)


def test_mahalanobis_forms_differ_but_rank_alike_on_clear_cases():
    train, near, far = _features(300, 8), _features(50, 8, seed=1), _features(50, 8, seed=2, shift=3.0)
    for form in ("official", "corrected"):
        s = Mahalanobis(train, form=form)
        assert s(near).mean() > s(far).mean()
    assert not np.allclose(Mahalanobis(train, form="official")(near), Mahalanobis(train, form="corrected")(near))


def test_mahalanobis_handles_a_singular_covariance():
    train = _features(50, 4)
    train[:, 3] = 0.0  # a constant dimension: std 0, covariance singular (pinv)
    assert np.isfinite(Mahalanobis(train)(_features(5, 4, seed=3))).all()


def _brute_knn(train, x, k):
    norm = lambda v: v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-10)  # noqa: E731
    d = np.linalg.norm(norm(x)[:, None, :] - norm(train)[None, :, :], axis=-1)
    return -np.sort(d, axis=1)[:, k - 1]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("k", [1, 7])
def test_knn_matches_brute_force(backend, k):
    pytest.importorskip("faiss") if backend == "faiss" else None
    train, test = _features(120, 16), _features(25, 16, seed=1)
    s = KNN(train, k=k, backend=backend, block=10)
    assert s.backend == backend
    np.testing.assert_allclose(s(test), _brute_knn(train, test, k), atol=2e-6)


def test_msp_from_logits():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(msp_from_logits(logits), [np.exp(2) / (np.exp(2) + 2), 1 / 3], atol=1e-12)


def test_linear_head_msp_is_confident_on_its_classes():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    y = rng.integers(0, 3, 300)
    x = centres[y] + rng.normal(size=(300, 8))
    s = LinearHeadMSP(x, y)
    ood = rng.normal(size=(100, 8))  # between the classes
    assert s(centres[y[:100]] + rng.normal(size=(100, 8))).mean() > s(ood).mean()
    with pytest.raises(ValueError, match="without a class label"):
        LinearHeadMSP(x, np.r_[y[:-1], -1])


def test_mcm_is_the_max_softmax_of_cosines():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 3))
    w /= np.linalg.norm(w, axis=0, keepdims=True)
    x = rng.normal(size=(4, 5))
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ w
    expect = (np.exp(cos / 0.5) / np.exp(cos / 0.5).sum(1, keepdims=True)).max(1)
    np.testing.assert_allclose(mcm(x, w, temperature=0.5), expect, atol=1e-12)


def test_bad_input():
    train = _features(20, 4)
    with pytest.raises(ValueError, match="features: expected feature size 4"):
        Mahalanobis(train)(_features(3, 5))
    with pytest.raises(ValueError, match="features: expected feature size 4"):
        KNN(train, k=2, backend="torch")(_features(3, 5))
    with pytest.raises(ValueError, match="train_features: expected a non-empty"):
        Mahalanobis(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="knn-k"):
        KNN(train, k=21)
    with pytest.raises(ValueError, match="finite"):
        Mahalanobis(train)(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="mahalanobis-form"):
        Mahalanobis(train, form="exact")
