import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyprotoclip.eval.linear_probe import linear_probe, split_indices
from pyprotoclip.eval.retrieval import retrieval_recall
from pyprotoclip.eval.zeroshot import build_classifier, topk_accuracy, zeroshot_classify, zeroshot_logits


def test_topk_matches_sklearn():
    from sklearn.metrics import top_k_accuracy_score

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 12, generator=g)
    labels = torch.randint(0, 12, (200,), generator=g)
    got = topk_accuracy(logits, labels, (1, 3, 5))
    for k in (1, 3, 5):
        want = top_k_accuracy_score(labels.numpy(), logits.numpy(), k=k, labels=list(range(12)))
        assert got[f"top{k}"] == pytest.approx(want, abs=1e-12)
    assert got["top1"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))


def test_topk_caps_k_at_class_count():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    labels = torch.tensor([1, 1, 0])
    assert topk_accuracy(logits, labels, (1, 5)) == {"top1": pytest.approx(1 / 3), "top5": 1.0}


def test_classifier_is_renormalised_template_mean():
    # "tokenizer" maps a prompt to its index; "encoder" returns fixed unnormalised vectors
    vecs = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-2.0, 0.0]])
    prompts = []

    def tok(texts):
        prompts.extend(texts)
        return torch.arange(len(prompts) - len(texts), len(prompts))

    w = build_classifier(lambda t: vecs[t], tok, ["cat", "dog"], ["a {}", "the {}."])
    assert prompts == ["a cat", "the cat.", "a dog", "the dog."]
    # class cat: mean of (1,0) and (0,1) -> (0.5,0.5) -> (1/sqrt2, 1/sqrt2); dog: mean of (1/sqrt2,1/sqrt2), (-1,0)
    r = 1 / np.sqrt(2)
    dog = np.array([(r - 1) / 2, r / 2])
    dog = dog / np.linalg.norm(dog)
    want = torch.tensor([[r, dog[0]], [r, dog[1]]], dtype=torch.float32)
    torch.testing.assert_close(w, want)
    logits = zeroshot_logits(torch.tensor([[2.0, 0.0]]), w)
    torch.testing.assert_close(logits, 100 * torch.tensor([[r, float(dog[0])]], dtype=torch.float32))


def test_zeroshot_classify_skips_unlabelled_rows():
    w = torch.eye(3)
    feats = torch.tensor([[5.0, 0, 0], [0, 1.0, 0], [0, 0, 2.0], [1.0, 0, 0]])
    labels = torch.tensor([0, 2, 2, -1])
    out = zeroshot_classify(feats, labels, w)
    assert out["num_samples"] == 3 and out["top1"] == pytest.approx(2 / 3) and out["top5"] == 1.0
    assert out["pred"].tolist() == [0, 1, 2]


def test_zeroshot_errors():
    with pytest.raises(ValueError, match="templates"):
        build_classifier(lambda t: t, lambda x: x, ["a"], ["no placeholder"])
    with pytest.raises(ValueError, match="classifier"):
        zeroshot_logits(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="labels"):
        zeroshot_classify(torch.randn(2, 3), torch.tensor([-1, -1]), torch.eye(3))


def test_retrieval_hand_values():
    # image i vs text j cosine similarities designed by hand (texts are unit vectors e_j, images rows of S)
    s = torch.tensor([
        [0.9, 0.1, 0.0],   # image 0: its text ranks 1st
        [0.8, 0.5, 0.1],   # image 1: text 1 ranks 2nd
        [0.7, 0.6, 0.2],   # image 2: text 2 ranks 3rd
    ])
    # make rows unit-norm by adding a 4th coordinate that no text has
    img = torch.cat([s, (1 - (s**2).sum(1, keepdim=True)).sqrt()], 1)
    txt = torch.eye(4)[:3]
    out = retrieval_recall(img, txt, ks=(1, 2, 3))
    assert out["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert out["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert out["image_to_text_R@3"] == 1.0
    # text j ranks images by column j of s: col0 -> image0 first; col1 -> image2 (0.6) before image1 (0.5);
    # col2 -> image2 first
    assert out["text_to_image_R@1"] == pytest.approx(2 / 3)
    assert out["text_to_image_R@2"] == 1.0
    assert out["mean_recall"] == pytest.approx(np.mean([1 / 3, 2 / 3, 1, 2 / 3, 1, 1]))


def test_retrieval_matches_argsort_definition():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(50, 16, generator=g), torch.randn(50, 16, generator=g)
    out = retrieval_recall(img, txt)
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    for name, m in (("image_to_text", sim), ("text_to_image", sim.t())):
        rank = (m.argsort(dim=1, descending=True) == torch.arange(50)[:, None]).float().argmax(1)
        for k in (1, 5, 10):
            assert out[f"{name}_R@{k}"] == pytest.approx(float((rank < k).float().mean()))


def _hand_case():
    # image i vs text j similarities (times 1/sqrt(2) after normalisation: ranks unchanged); texts are e_j
    s = torch.tensor([
        [0.1, 0.9, 0.5, 0.2],
        [0.8, 0.3, 0.6, 0.1],
        [0.7, 0.6, 0.5, 0.1],
        [0.2, 0.1, 0.3, 0.4],
    ])
    img = torch.cat([s, (2 - (s**2).sum(1, keepdim=True)).sqrt()], 1)
    return img, torch.eye(5)[:4]


def test_retrieval_ranks_keep_caption_groups_on_the_features_device():
    # the caption groups are built on the CPU; features on another device (meta: shapes only, no GPU needed)
    from pyprotoclip.eval.retrieval import _ranks, caption_groups

    q = torch.randn(5, 3, device="meta")
    ranks = _ranks(q, q, caption_groups(["a", "b", "a", "c", "b"]), chunk=2)
    assert ranks.device.type == "meta" and ranks.shape == (5,)


def test_retrieval_counts_any_caption_with_the_same_text():
    img, txt = _hand_case()
    captions = ["a red circle", "a red circle", "a blue star", "a green square"]
    got = retrieval_recall(img, txt, ks=(1, 2, 3), captions=captions)
    # image->text, correct texts {0, 1} for images 0 and 1: best correct 0.9 and 0.8, both first -> ranks 0, 0;
    # image 2: text 2 (0.5) below 0.7, 0.6 -> rank 2; image 3: rank 0
    assert got["image_to_text_R@1"] == pytest.approx(3 / 4)
    assert got["image_to_text_R@2"] == pytest.approx(3 / 4)
    assert got["image_to_text_R@3"] == 1.0
    # text->image by columns: text 0 -> images {0, 1}: 0.8 first; text 1 -> 0.9 first; text 2: image 1 (0.6)
    # above image 2 (0.5; image 0's 0.5 ties, in its favour) -> rank 1; text 3 first
    assert got["text_to_image_R@1"] == pytest.approx(3 / 4)
    assert got["text_to_image_R@2"] == 1.0
    assert got["retrieval_num_captions"] == 4 and got["retrieval_distinct_captions"] == 3
    # row pairing only: image ranks 3, 2, 2, 0 and text ranks 3, 2, 1, 0
    plain = retrieval_recall(img, txt, ks=(1, 2, 3))
    assert plain["image_to_text_R@1"] == pytest.approx(1 / 4) and plain["image_to_text_R@3"] == pytest.approx(3 / 4)
    assert plain["text_to_image_R@2"] == pytest.approx(2 / 4) and "retrieval_distinct_captions" not in plain
    # all captions distinct: the same as row pairing
    distinct = retrieval_recall(img, txt, ks=(1, 2, 3), captions=["w", "x", "y", "z"])
    assert {k: v for k, v in distinct.items() if not k.startswith("retrieval_")} == plain


def test_retrieval_errors():
    with pytest.raises(ValueError, match="text_features"):
        retrieval_recall(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="captions"):
        retrieval_recall(torch.randn(4, 3), torch.randn(4, 3), captions=["a"] * 3)


def test_linear_probe_matches_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 8)) * 2
    y = np.repeat(np.arange(5), 40)
    x = (centers[y] + rng.normal(size=(200, 8)) * 1.5).astype(np.float32)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    y_t_with_unlabelled = torch.cat([y_t, torch.tensor([-1, -1])])
    x_t_with_unlabelled = torch.cat([x_t, torch.zeros(2, 8)])
    got = linear_probe(x_t_with_unlabelled, y_t_with_unlabelled, test_fraction=0.25, seed=3)
    tr, te = split_indices(y, 0.25, 3)
    assert len(te) == 50 and not set(tr) & set(te)
    assert np.bincount(y[te]).tolist() == [10] * 5  # stratified
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=3)).fit(x[tr], y[tr])
    assert got["top1"] == pytest.approx(clf.score(x[te], y[te]))
    assert got["num_train"] == 150 and got["num_test"] == 50 and got["num_classes"] == 5
    assert 0.5 < got["top1"] < 1.0  # separable enough to learn, noisy enough to not be trivial


def test_linear_probe_errors():
    with pytest.raises(ValueError, match="labels"):
        linear_probe(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="test_fraction"):
        linear_probe(torch.randn(10, 3), torch.arange(10) % 2, test_fraction=1.0)


def test_clustering_scores_find_separated_classes_and_the_gap_is_a_distance():
    import torch

    from pyprotoclip.eval.clustering import clustering_scores, modality_gap

    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 5
    labels = torch.arange(4).repeat_interleave(25)
    x = centres[labels] + 0.1 * torch.randn(100, 4, generator=g)
    s = clustering_scores(x, labels)
    assert s["clustering_ari"] == pytest.approx(1.0) and s["clustering_ami"] == pytest.approx(1.0) and s["clustering_k"] == 4
    shuffled = clustering_scores(x, labels[torch.randperm(100, generator=g)])
    assert abs(shuffled["clustering_ari"]) < 0.1
    # two modalities pointing along e0 and e1: the gap is |e0 - e1| = sqrt(2)
    assert modality_gap(torch.tensor([[2.0, 0.0]] * 3), torch.tensor([[0.0, 3.0]] * 3)) == pytest.approx(2 ** 0.5)


def test_linear_probe_train_test_counts_evaluation_classes_missing_from_the_fit():
    from pyprotoclip.eval.linear_probe import linear_probe_train_test

    rng = np.random.default_rng(2)
    centers = rng.normal(size=(4, 5)) * 3
    y_tr, y_te = np.repeat([0, 1], 20), np.repeat(np.arange(4), 5)  # classes 2 and 3 never in the fit
    x_tr = (centers[y_tr] + rng.normal(size=(40, 5))).astype(np.float32)
    x_te = (centers[y_te] + rng.normal(size=(20, 5))).astype(np.float32)
    got = linear_probe_train_test(x_tr, y_tr, x_te, y_te, C=1.0)
    assert got["num_classes"] == 2 and got["missing_classes"] == 2 and got["num_test_missing"] == 10
    assert got["top1"] <= 0.5
    full = linear_probe_train_test(x_te, y_te, x_te, y_te, C=1.0)
    assert full["missing_classes"] == 0 and full["num_test_missing"] == 0


def test_linear_probe_train_test_chooses_c_on_held_out_training_rows():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pyprotoclip.eval.linear_probe import DEFAULT_CS, linear_probe_train_test

    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 6)) * 1.5
    y_tr, y_te = np.repeat(np.arange(3), 30), np.repeat(np.arange(3), 10)
    x_tr = (centers[y_tr] + rng.normal(size=(90, 6))).astype(np.float32)
    x_te = (centers[y_te] + rng.normal(size=(30, 6))).astype(np.float32)
    got = linear_probe_train_test(x_tr, y_tr, torch.from_numpy(x_te), torch.from_numpy(y_te), Cs=(0.001, 1.0), seed=0)
    # the same by hand: fit on 80% of the training rows for each C, keep the best, refit on all 90, test on the 30
    fit, val = split_indices(y_tr, 0.2, 0)
    assert len(val) == 18 and np.bincount(y_tr[val]).tolist() == [6, 6, 6]
    acc = {c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000, random_state=0)).fit(x_tr[fit], y_tr[fit])
           .score(x_tr[val], y_tr[val]) for c in (0.001, 1.0)}
    assert got["c_sweep"] == pytest.approx(acc)
    best = min(c for c in acc if acc[c] == max(acc.values()))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=best, max_iter=1000, random_state=0)).fit(x_tr, y_tr)
    assert got["C"] == best and got["top1"] == pytest.approx(clf.score(x_te, y_te))
    assert got["num_train"] == 90 and got["num_test"] == 30
    assert got["protocol"] == f"train->eval, C={best:.3g} chosen on a 20% held-out part of the training split"
    fixed = linear_probe_train_test(x_tr, y_tr, x_te, y_te, C=0.25)
    assert fixed["protocol"] == "train->eval, C=0.25 (--probe-c)" and "c_sweep" not in fixed
    assert DEFAULT_CS[0] == 0.001 and DEFAULT_CS[5] == pytest.approx(0.316228) and DEFAULT_CS[-1] == 100.0
    with pytest.raises(ValueError, match="train-data"):
        linear_probe_train_test(x_tr, np.zeros(90, dtype=int), x_te, y_te)


def test_summary_plot_has_one_legend_for_both_axes_and_a_tight_box(tmp_path, monkeypatch):
    import json

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from pyprotoclip.eval.plot import summary_plot

    seen = {}
    real = Figure.savefig

    def spy(self, path, **kw):
        seen["labels"] = [t.get_text() for ax in self.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        seen["kw"] = kw
        return real(self, path, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    (tmp_path / "results.jsonl").write_text("".join(
        json.dumps({"type": "train", "step": s, "contrastive_loss": 3.0 - s / 10, "scale": 14.0 + s}) + "\n" for s in range(1, 4)))
    names = [f"a rather long class name {i}" for i in range(3)]
    summary_plot(str(tmp_path / "p.png"), confusion=np.eye(3, dtype=int), classnames=names, run_dir=str(tmp_path))
    assert "train loss" in seen["labels"] and "logit scale" in seen["labels"]
    assert seen["kw"].get("bbox_inches") == "tight"
    # without a confusion matrix (no labels): still a PNG
    summary_plot(str(tmp_path / "q.png"), confusion=None, classnames=[], metrics={"skipped": ["zero-shot (no labels)"]})
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_retrieval_ranks_do_not_depend_on_the_chunk_size():
    from pyprotoclip.eval.retrieval import _ranks, caption_groups

    g = torch.Generator().manual_seed(2)
    q, k = F.normalize(torch.randn(37, 8, generator=g), dim=-1), F.normalize(torch.randn(37, 8, generator=g), dim=-1)
    groups = caption_groups([f"c{i % 5}" for i in range(37)])
    assert groups.tolist()[:6] == [0, 1, 2, 3, 4, 0]
    for grp in (None, groups):
        assert torch.equal(_ranks(q, k, grp, chunk=4), _ranks(q, k, grp))
