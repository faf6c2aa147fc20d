"""CyCLIP's consistency scores on hand-computed tiny cases, and their place in evaluate_model / the eval table."""

import pytest
import torch

from pyprotoclip.eval.consistency import consistency_scores, knn_predict


def test_knn_leave_one_out_and_official_tie_rule():
    # unit vectors at known angles: cosine similarity falls with the angle between them
    angles = torch.tensor([0.0, 0.1, 0.25, 1.5, 1.6, 3.0])
    points = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    pred = knn_predict(points, points, labels, (1, 2, 3), leave_one_out=True)
    # nearest other point: 0->1, 1->0, 2->1, 3->4, 4->3, 5->4
    assert pred[1].tolist() == [0, 0, 0, 1, 1, 1]
    # k=2: point 2's neighbours 1 (label 0) and 0 (label 0) -> 0; point 5's 4 (1) and 3 (1) -> 1;
    # points 0 and 1 have one neighbour of label 0 and one of label 1: a tie, k drops to 1 -> 0
    assert pred[2].tolist() == [0, 0, 0, 1, 1, 1]
    # k=3: point 0: 1 (0), 2 (1), 3 (1) -> 1 wins outright
    assert pred[3][0].item() == 1
    # without leave-one-out a point is its own nearest neighbour
    assert knn_predict(points, points, labels, (1,))[1].tolist() == labels.tolist()


def _at(*angles):
    a = torch.tensor(angles)
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_scores_hand_computed():
    # unit vectors at these angles; two classes whose prompts lie along e1 (class 0) and e2 (class 1)
    image = _at(0.0, 0.5, 1.5, 0.7)
    text = _at(1.6, 1.5, 1.3, 1.2)
    labels = torch.tensor([0, 0, 1, 1])
    classifier = torch.eye(2)  # (D, C)
    # zero-shot (angle < pi/4 -> class 0):                       [0, 0, 1, 0]
    # image kNN, leave-one-out: 0->1, 1->3, 2->3, 3->1         => [0, 1, 1, 0]
    # text kNN, leave-one-out:  0->1, 1->0, 2->3, 3->2         => [0, 0, 1, 1]
    got = consistency_scores(image, text, labels, classifier=classifier, ks=(1,))
    assert got["crossmodal_consistency@1"] == pytest.approx(3 / 4)
    assert got["inmodal_consistency@1"] == pytest.approx(2 / 4)
    assert got["image_knn_top1@1"] == pytest.approx(2 / 4)
    # unlabelled rows are left out; without a classifier there is no cross-modal score
    more = consistency_scores(torch.cat([image, image[:1]]), torch.cat([text, text[:1]]), torch.cat([labels, torch.tensor([-1])]))
    assert "crossmodal_consistency@1" not in more and more["inmodal_consistency@1"] == pytest.approx(2 / 4)


def test_identical_geometry_gives_full_in_modal_consistency():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 8, generator=g)
    labels = torch.randint(0, 5, (60,), generator=g)
    got = consistency_scores(feats, feats * 3.0, labels, ks=(1, 5))
    assert got["inmodal_consistency@1"] == 1.0 and got["inmodal_consistency@5"] == 1.0


def test_reference_set_replaces_leave_one_out():
    ref = {"image_features": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "text_features": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
           "labels": torch.tensor([0, 1])}
    image = torch.tensor([[1.0, 0.2], [0.1, 1.0]])
    text = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
    got = consistency_scores(image, text, torch.tensor([0, 1]), classifier=torch.eye(2), ks=(1,), reference=ref)
    # image kNN: [0, 1]; text kNN (reference captions swapped): [1, 0]; zero-shot [0, 1]
    assert got == {"crossmodal_consistency@1": 1.0, "inmodal_consistency@1": 0.0, "image_knn_top1@1": 1.0}


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="labels"):
        consistency_scores(torch.ones(3, 2), torch.ones(3, 2), torch.tensor([-1, -1, -1]))
    with pytest.raises(ValueError, match="classifier"):
        consistency_scores(torch.ones(3, 2), torch.ones(3, 2), torch.tensor([0, 1, 0]), classifier=torch.eye(3))
    with pytest.raises(ValueError, match="ks"):
        knn_predict(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([0]), (1,), leave_one_out=True)


def test_evaluate_model_reports_consistency_beside_zero_shot():
    from pyprotoclip.eval.evaluate import format_table
    from pyprotoclip.eval.metrics import evaluate_model

    class Towers(torch.nn.Module):
        logit_scale = torch.nn.Parameter(torch.tensor(2.0))

        def encode_image(self, x, normalize=False):
            return x

        def encode_text(self, t, normalize=False):
            return torch.nn.functional.one_hot(t[:, 0], 2).float() + 0.1

    image = torch.tensor([[1.0, 0.1], [1.0, 0.3], [0.2, 1.0], [0.9, 0.5]])
    loader = [{"image": image, "text": torch.tensor([[0], [0], [1], [1]]), "label": torch.tensor([0, 0, 1, 1])}]
    tok = lambda prompts: torch.tensor([[0 if "zero" in p else 1] for p in prompts])  # noqa: E731
    metrics, _ = evaluate_model(Towers(), loader, tokenizer=tok, classnames=["zero", "one"], templates=["{}"])
    for key in ("crossmodal_consistency@1", "crossmodal_consistency@5", "inmodal_consistency@1", "image_knn_top1@1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    want = consistency_scores(image, Towers().encode_text(torch.tensor([[0], [0], [1], [1]])), torch.tensor([0, 0, 1, 1]),
                              classifier=torch.nn.functional.normalize(torch.eye(2) + 0.1, dim=0), ks=(1,))
    assert metrics["crossmodal_consistency@1"] == want["crossmodal_consistency@1"]
    table = format_table(metrics)
    assert "cross-modal consistency @1" in table and "in-modal consistency @1" in table
