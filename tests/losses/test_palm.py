"""PALMLoss against a float64 transcription of the official code (jeff024/PALM, util/loss_functions.py),
the pieces (Sinkhorn marginals, masking, top-k, EMA), bad input, and 2 gloo processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pyprotoclip.losses import PALMLoss
from tests.utils import assert_close_verbose


class OfficialPALM:
    """The official PALM module, line by line (``.cuda()`` dropped, ``args`` spelled out; ``detach_update``
    is pyprotoclip's option, off in the official code)."""

    def __init__(self, protos, num_classes, cache_size, nviews, k, proto_m, temp, lambda_pcon, epsilon=0.05,
                 detach_update=False):
        self.num_classes, self.cache_size, self.nviews = num_classes, cache_size, nviews
        self.temp, self.lambda_pcon, self.epsilon = temp, lambda_pcon, epsilon
        self.sinkhorn_iterations = 3
        self.k = min(k, cache_size)
        self.proto_m = proto_m
        self.protos = protos.clone()
        self.detach_update = detach_update

    def sinkhorn(self, features):
        out = torch.matmul(features, self.protos.detach().T)
        Q = torch.exp(out.detach() / self.epsilon).t()
        B = Q.shape[1]
        K = Q.shape[0]
        sum_Q = torch.sum(Q)
        Q /= sum_Q
        for _ in range(self.sinkhorn_iterations):
            Q = F.normalize(Q, dim=1, p=1)
            Q /= K
            Q = F.normalize(Q, dim=0, p=1)
            Q /= B
        Q *= B
        return Q.t()

    def mle_loss(self, features, targets):
        features = torch.cat(torch.unbind(features, dim=1), dim=0)
        anchor_labels = targets.contiguous().repeat(self.nviews).view(-1, 1)
        contrast_labels = torch.arange(self.num_classes).repeat(self.cache_size).view(-1, 1)
        mask = torch.eq(anchor_labels, contrast_labels.T).to(features.dtype)
        Q = self.sinkhorn(features)
        if self.k > 0:
            update_mask = mask * Q
            _, topk_idx = torch.topk(update_mask, self.k, dim=1)
            topk_mask = torch.scatter(torch.zeros_like(update_mask), 1, topk_idx, 1)
            update_mask = F.normalize(F.normalize(topk_mask * update_mask, dim=1, p=1), dim=0, p=1)
        else:
            update_mask = F.normalize(F.normalize(mask * Q, dim=1, p=1), dim=0, p=1)
        update_features = torch.matmul(update_mask.T, features.detach() if self.detach_update else features)
        protos = self.protos
        protos = self.proto_m * protos + (1 - self.proto_m) * update_features
        self.protos = F.normalize(protos, dim=1, p=2)
        Q = self.sinkhorn(features)
        proto_dis = torch.matmul(features, self.protos.detach().T)
        logits = torch.div(proto_dis, self.temp)
        if self.k > 0:
            loss_mask = mask * Q
            _, topk_idx = torch.topk(update_mask, self.k, dim=1)
            topk_mask = torch.scatter(torch.zeros_like(update_mask), 1, topk_idx, 1)
            loss_mask = F.normalize(topk_mask * loss_mask, dim=1, p=1)
            masked_logits = loss_mask * logits
        else:
            masked_logits = F.normalize(Q * mask, dim=1, p=1) * logits
        pos = torch.sum(masked_logits, dim=1)
        neg = torch.log(torch.sum(torch.exp(logits), dim=1, keepdim=True))
        log_prob = pos - neg
        return -torch.mean(log_prob)

    def proto_contra(self):
        protos = F.normalize(self.protos, dim=1)
        batch_size = self.num_classes
        proto_labels = torch.arange(self.num_classes).repeat(self.cache_size).view(-1, 1)
        mask = torch.eq(proto_labels, proto_labels.T).to(protos.dtype)
        anchor_count = self.cache_size
        anchor_dot_contrast = torch.div(torch.matmul(protos, protos.T), 0.5)
        logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
        logits = anchor_dot_contrast - logits_max.detach()
        logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0)
        mask = mask * logits_mask
        pos = torch.sum(F.normalize(mask, dim=1, p=1) * logits, dim=1)
        neg = torch.log(torch.sum(logits_mask * torch.exp(logits), dim=1))
        return -torch.mean(pos - neg)

    def forward(self, features, targets):
        g_con = self.mle_loss(features, targets)
        loss = g_con
        g_dis = None
        if self.lambda_pcon > 0:
            g_dis = self.lambda_pcon * self.proto_contra()
            loss = loss + g_dis
        self.protos = self.protos.detach()
        return loss, g_con, g_dis


def _inputs(b, v, c, d, seed=0, clustered=True):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (b,), generator=g)
    feats = torch.randn(b, v, d, generator=g, dtype=torch.float64)
    if clustered:  # features near a per-class direction, so the class masks matter
        centres = torch.randn(c, d, generator=g, dtype=torch.float64)
        feats = feats * 0.5 + centres[labels][:, None, :]
    return F.normalize(feats, dim=-1), labels


CONFIGS = [  # (C, M, k, views, lambda, m)
    (4, 6, 5, 2, 1.0, 0.999),
    (3, 3, 0, 2, 1.0, 0.9),
    (5, 4, 2, 1, 0.5, 0.5),
    (3, 1, 5, 2, 1.0, 0.99),  # one prototype per class: L_pc has no positives, k capped at 1
    (4, 6, 5, 2, 0.0, 0.999),
]


@pytest.mark.parametrize("c,m,k,v,lam,mom", CONFIGS)
@pytest.mark.parametrize("detach", [False, True])
def test_matches_official_loss_prototypes_and_gradients(c, m, k, v, lam, mom, detach):
    d, b = 8, 10
    torch.manual_seed(3)
    loss_fn = PALMLoss(c, feat_dim=d, prototypes_per_class=m, topk=k, proto_momentum=mom, lambda_pcon=lam,
                       detach_proto_update=detach).double()
    official = OfficialPALM(loss_fn.prototypes, c, m, v, k, mom, 0.1, lam, detach_update=detach)
    for step in range(3):  # the prototypes evolve: compare every step
        feats, labels = _inputs(b, v, c, d, seed=step)
        ours_in = feats.clone().requires_grad_()
        ref_in = feats.clone().requires_grad_()
        terms = loss_fn(ours_in, labels)
        loss, mle, pcon = official.forward(ref_in, labels)
        terms["loss"].backward()
        loss.backward()
        assert_close_verbose(terms["mle"], mle, atol=1e-12, name=f"mle step {step}")
        if lam > 0:
            assert_close_verbose(terms["proto_contra"], pcon, atol=1e-12, name=f"proto_contra step {step}")
        else:
            assert "proto_contra" not in terms
        assert_close_verbose(terms["loss"], loss, atol=1e-12, name=f"loss step {step}")
        assert_close_verbose(loss_fn.prototypes, official.protos, atol=1e-13, name=f"prototypes step {step}")
        assert_close_verbose(ours_in.grad, ref_in.grad, atol=1e-12, name=f"features grad step {step}")


def test_ema_gradient_path_is_small_and_detach_removes_it():
    torch.manual_seed(0)
    feats, labels = _inputs(16, 2, 4, 8)
    for detach in (True, False):
        torch.manual_seed(1)
        loss_fn = PALMLoss(4, feat_dim=8, detach_proto_update=detach).double()
        x = feats.clone().requires_grad_()
        terms = loss_fn(x, labels)
        if detach:
            assert not terms["proto_contra"].requires_grad
            continue
        terms["proto_contra"].backward()
        pcon_grad = x.grad.clone()
        x.grad = None
        terms["mle"].backward()
        grads = (pcon_grad, x.grad)
    # L_pc reaches the features only through (1 - m) W^T F: about 1e-3 of the MLE gradient at m = 0.999
    ratio = float(grads[0].norm() / grads[1].norm())
    assert 0 < ratio < 1e-2, ratio


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    loss_fn = PALMLoss(5, feat_dim=16, prototypes_per_class=4, sinkhorn_iterations=3).double()
    z = F.normalize(torch.randn(40, 16, dtype=torch.float64), dim=1)
    q = loss_fn.sinkhorn(z, loss_fn.prototypes)
    assert q.shape == (40, 20) and bool((q >= 0).all())
    assert_close_verbose(q.sum(1), torch.ones(40, dtype=torch.float64), atol=1e-12, name="rows")
    official = OfficialPALM(loss_fn.prototypes, 5, 4, 1, 0, 0.9, 0.1, 1.0)
    assert_close_verbose(q, official.sinkhorn(z), atol=1e-14, name="official")
    # with enough iterations the prototype marginals reach the uniform N / P
    loss_fn.sinkhorn_iterations = 300
    q = loss_fn.sinkhorn(z, loss_fn.prototypes)
    assert_close_verbose(q.sum(0), torch.full((20,), 2.0, dtype=torch.float64), atol=1e-6, name="prototype marginals")


def test_masking_topk_and_update_weights():
    torch.manual_seed(0)
    c, m, k = 4, 6, 3
    loss_fn = PALMLoss(c, feat_dim=8, prototypes_per_class=m, topk=k).double()
    z, labels = _inputs(12, 1, c, 8)
    z, labels = z[:, 0], labels
    w = loss_fn._update_weights(loss_fn.sinkhorn(z, loss_fn.prototypes), labels)
    proto_class = torch.arange(c).repeat(m)
    own = labels[:, None] == proto_class[None, :]
    assert not bool(w[~own].any()), "weight on another class's prototype"
    assert bool(((w > 0).sum(1) <= k).all()) and bool(((w > 0).sum(1) >= 1).all())
    col = w.sum(0)
    assert bool((((col - 1).abs() < 1e-12) | (col == 0)).all())
    # a class with no sample in the batch: its prototypes get no weight and keep their value
    loss_fn.prototypes = F.normalize(loss_fn.prototypes, dim=1)  # unit in float64 (they were made in float32)
    before = loss_fn.prototypes.clone()
    absent = [cl for cl in range(c) if cl not in labels.tolist()]
    labels_missing = labels.clone()
    labels_missing[labels_missing == 0] = 1
    loss_fn(z, labels_missing)
    moved = (loss_fn.prototypes - before).abs().amax(dim=1) > 1e-9
    for j in range(c * m):
        if proto_class[j] == 0 or proto_class[j] in absent:
            assert_close_verbose(loss_fn.prototypes[j], before[j], atol=1e-15, name=f"prototype {j} of an absent class")
    for cl in set(labels_missing.tolist()):
        assert bool(moved[proto_class == cl].any()), f"no prototype of class {cl} moved"


def test_ema_update_formula():
    torch.manual_seed(0)
    loss_fn = PALMLoss(3, feat_dim=8, prototypes_per_class=2, topk=2, proto_momentum=0.8).double()
    z, labels = _inputs(9, 1, 3, 8)
    z = z[:, 0]
    before = loss_fn.prototypes.clone()
    w = loss_fn._update_weights(loss_fn.sinkhorn(z, before), labels)
    loss_fn(z, labels)
    expect = F.normalize(0.8 * before + 0.2 * w.t() @ z, dim=1)
    assert_close_verbose(loss_fn.prototypes, expect, atol=1e-14, name="EMA")
    assert_close_verbose(loss_fn.prototypes.norm(dim=1), torch.ones(6, dtype=torch.float64), atol=1e-14, name="unit")


def test_mle_rows_without_weight_keep_the_official_value():
    # the official row normalisation divides by max(sum, 1e-12): a row summing to s < 1 (0 when the top-k
    # entries underflow) still has loss lse - sum_j L_ij logit_ij
    torch.manual_seed(0)
    loss_fn = PALMLoss(2, feat_dim=4, prototypes_per_class=2).double()
    z = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    protos = loss_fn.prototypes
    weights = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0, 0], [0.3e-3, 0, 0, 0]], dtype=torch.float64)
    logits = z @ protos.t() / 0.1
    expect = (torch.logsumexp(logits, 1) - (weights * logits).sum(1)).mean()
    assert_close_verbose(loss_fn._mle_loss(z, protos, weights), expect, atol=1e-12, name="mle")


def test_unlabelled_variant():
    torch.manual_seed(0)
    loss_fn = PALMLoss(3, feat_dim=8, prototypes_per_class=4, topk=5, class_masks=False).double()
    assert loss_fn.topk == 5  # capped at C*M, not at M
    z = F.normalize(torch.randn(2, 10, 8, dtype=torch.float64), dim=-1)
    before = loss_fn.prototypes.clone()
    terms = loss_fn(z.transpose(0, 1))
    assert torch.isfinite(terms["loss"]) and not torch.allclose(before, loss_fn.prototypes)
    p = F.normalize(loss_fn.prototypes, dim=1)
    logits = p @ p.t() / 0.5
    logits = logits - logits.max(1, keepdim=True).values
    off = ~torch.eye(12, dtype=torch.bool)
    expect = torch.stack([torch.logsumexp(logits[a][off[a]], 0) for a in range(12)]).mean()
    assert_close_verbose(loss_fn.proto_contrastive_loss(loss_fn.prototypes), expect, atol=1e-12, name="uniformity")


def test_prototypes_are_saved_and_restored():
    a = PALMLoss(3, feat_dim=8)
    z, labels = _inputs(6, 2, 3, 8)
    a(z.float(), labels)
    state = a.state_dict()
    assert set(state) == {"prototypes"}
    b = PALMLoss(3, feat_dim=8)
    b.load_state_dict(state)
    assert torch.equal(a.prototypes, b.prototypes)


def test_float32_with_fused_op_matches_float64():
    torch.manual_seed(0)
    loss64 = PALMLoss(10, feat_dim=32).double()
    loss32 = PALMLoss(10, feat_dim=32)
    loss32.prototypes = loss64.prototypes.float().clone()
    z, labels = _inputs(64, 2, 10, 32)
    t64, t32 = loss64(z, labels), loss32(z.float(), labels)
    assert_close_verbose(t32["loss"], t64["loss"], atol=2e-5, rtol=1e-5, name="loss fp32")
    assert_close_verbose(loss32.prototypes, loss64.prototypes, atol=1e-6, name="prototypes fp32")


@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 0}, "num_classes"),
    ({"num_classes": 3, "topk": -1}, "topk"),
    ({"num_classes": 3, "proto_momentum": 1.5}, "proto_momentum"),
    ({"num_classes": 3, "epsilon": 0.0}, "epsilon"),
    ({"num_classes": 3, "temperature": -1.0}, "temperature"),
    ({"num_classes": 3, "lambda_pcon": -1.0}, "lambda_pcon"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PALMLoss(**kwargs)


def test_bad_input():
    loss_fn = PALMLoss(3, feat_dim=8)
    z = F.normalize(torch.randn(4, 2, 8), dim=-1)
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 3\)"):
        loss_fn(z, torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match=r"labels: expected class indices"):
        loss_fn(z, torch.tensor([0, -1, 1, 2]))
    with pytest.raises(ValueError, match="labels: expected shape"):
        loss_fn(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels: expected dtype int64"):
        loss_fn(z, torch.tensor([0.0, 1.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="features: expected feature size 8"):
        loss_fn(torch.randn(4, 2, 16), torch.tensor([0, 1, 1, 2]))
    with pytest.raises(ValueError, match="labels: expected .* got None"):
        loss_fn(z)


# ---- 2 processes (gloo) ------------------------------------------------------------------------------------

PER_RANK = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch():
    return _inputs(2 * PER_RANK, 2, 4, 8, seed=7)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(5)
        loss_fn = PALMLoss(4, feat_dim=8, prototypes_per_class=3, topk=2, proto_momentum=0.9).double()
        out = {"grads": [], "losses": [], "protos": []}
        for step in range(2):
            feats, labels = _inputs(2 * PER_RANK, 2, 4, 8, seed=7 + step)
            sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            x = feats[sl].clone().requires_grad_()
            terms = loss_fn(x, labels[sl])
            terms["loss"].backward()
            out["grads"].append(x.grad)
            out["losses"].append(terms["loss"].detach())
            out["protos"].append(loss_fn.prototypes.clone())
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_hold_identical_prototypes_and_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    torch.manual_seed(5)
    single = PALMLoss(4, feat_dim=8, prototypes_per_class=3, topk=2, proto_momentum=0.9).double()
    for step in range(2):
        assert torch.equal(r0["protos"][step], r1["protos"][step]), "ranks disagree on the prototypes"
        feats, labels = _inputs(2 * PER_RANK, 2, 4, 8, seed=7 + step)
        x = feats.clone().requires_grad_()
        terms = single(x, labels)
        terms["loss"].backward()
        assert_close_verbose(r0["protos"][step], single.prototypes, atol=1e-13, name=f"prototypes step {step}")
        mean_loss = (r0["losses"][step] + r1["losses"][step]) / 2
        assert_close_verbose(mean_loss, terms["loss"], atol=1e-12, name=f"loss step {step}")
        # DDP averages the ranks' gradients: rank r's rows get (its gradient) / 2
        got = torch.cat([r0["grads"][step], r1["grads"][step]]) / 2
        assert_close_verbose(got, x.grad, atol=1e-12, name=f"features grad step {step}")
