"""ProtoCLIP's losses, PBT and model against the spec's formulas, written out here in float64."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pyprotoclip.losses import ProtoCLIPLoss, ProtoCLIPMethod, ProtoCLIPModel, ProtoLoss, StepContext
from pyprotoclip.losses import episode as ep
from pyprotoclip.train import params as P

HERE = os.path.dirname(__file__)


def spec_proto_loss(h, protos, s, labels, centroids=None, tau_t=0.0):
    """Mean over rows of lse_k(s <h_i, P_k>) - sum_k q_ik s <h_i, P_k>; q soft (centroids, tau_t > 0) or one-hot."""
    h, protos, s = h.double(), protos.double(), s.double()
    a = s * h @ protos.t()
    if tau_t > 0:
        c = centroids.double()
        q = torch.softmax(c[labels] @ c.t() / tau_t, dim=1)
    else:
        q = F.one_hot(labels, protos.shape[0]).double()
    return (torch.logsumexp(a, dim=1) - (q * a).sum(1)).mean()


def _inputs(b=7, k=5, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = F.normalize(torch.randn(b, d, generator=g), dim=1)
    protos = torch.randn(k, d, generator=g) * 0.5
    centroids = torch.randn(k, d, generator=g)
    labels = torch.randint(k, (b,), generator=g)
    return h, protos, centroids, labels


@pytest.mark.parametrize("tau_t", [0.0, 0.5, 0.01])
def test_proto_loss_value_and_gradients_match_the_spec(tau_t):
    h, protos, centroids, labels = _inputs()
    t = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    h1 = h.clone().requires_grad_()
    got = ProtoLoss(tau_t)(h1, protos, t.exp(), labels, centroids)
    got.backward()
    h2, t2 = h.double().clone().requires_grad_(), t.detach().double().clone().requires_grad_()
    want = spec_proto_loss(h2, protos, t2.exp(), labels, centroids, tau_t)
    want.backward()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(h1.grad.double(), h2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(t.grad.double(), t2.grad, atol=1e-5, rtol=1e-5)
    assert t.grad.abs() > 1e-4  # the scale really gets a gradient
    assert protos.grad is None and centroids.grad is None


def test_proto_loss_hand_computed():
    # two rows, two prototypes, s = 1: a = [[1, 0], [0, 2]]; hard labels [0, 1]
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    got = ProtoLoss(0.0)(h, protos, torch.tensor(1.0), torch.tensor([0, 1]))
    want = 0.5 * ((math.log(math.e + 1) - 1) + (math.log(1 + math.e**2) - 2))
    assert float(got) == pytest.approx(want, abs=1e-6)
    # soft targets from centroids C = I at tau_t = 1: q_0 = softmax([1, 0]) = [e, 1] / (e + 1)
    c = torch.eye(2)
    got = ProtoLoss(1.0)(h, protos, torch.tensor(1.0), torch.tensor([0, 0]), c)
    q = torch.tensor([math.e, 1.0]) / (math.e + 1)
    row = lambda a: math.log(math.exp(a[0]) + math.exp(a[1])) - float(q @ torch.tensor(a))  # noqa: E731
    assert float(got) == pytest.approx(0.5 * (row([1.0, 0.0]) + row([0.0, 2.0])), abs=1e-6)


def test_pbt_means_of_the_other_modality_with_empty_clusters_as_zero_rows():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([2, 0, 2, 2])  # cluster 1 is empty
    means, counts = ep.translate(feats, labels, 4)
    torch.testing.assert_close(means, torch.tensor([[0.0, 1.0], [0.0, 0.0], [5 / 3, 4 / 3], [0.0, 0.0]]))
    assert counts.tolist() == [1.0, 0.0, 3.0, 0.0]


def test_usage_counts_empty_clusters_and_entropy():
    u = ep.usage(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert u["empty_clusters"] == 2 and u["cluster_entropy"] == pytest.approx(math.log(2))
    assert u["effective_clusters"] == pytest.approx(2.0)


def _params(**kw):
    p = P.defaults()
    p.update(method="protoclip", train_data="x", add_projection_head=True, projection_dim=8, projection_hidden_dim=16,
             num_prototypes=5, PBT=True, target_temperature=0.5)
    p.update(kw)
    return p


def _state(k=5, d=8, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ep.EpisodeState(
        episode=0, image_labels=torch.randint(k, (n,), generator=g), text_labels=torch.randint(k, (n,), generator=g),
        external_labels=torch.randint(k, (n,), generator=g), image_centroids=torch.randn(k, d, generator=g),
        text_centroids=torch.randn(k, d, generator=g), image_prototypes=torch.randn(k, d, generator=g),
        text_prototypes=torch.randn(k, d, generator=g), image_external_prototypes=torch.randn(k, d, generator=g),
        text_external_prototypes=torch.randn(k, d, generator=g))


def _outputs(n=6, d=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = {k: F.normalize(torch.randn(n, d, generator=g), dim=1) for k in
           ("image_features", "text_features", "image_proto_features", "text_proto_features")}
    out.update(logit_scale=torch.tensor(10.0), logit_scale_proto=torch.tensor(12.0))
    return out


def test_protoclip_total_is_the_spec_weighted_sum():
    from pyprotoclip.ops import reference

    method = ProtoCLIPMethod(_params(external_teacher=None, w_clip=0.7, w_proto=1.3))
    method.state = _state()
    pos = torch.tensor([0, 3, 4, 7, 9, 11])
    out = _outputs()
    terms = ProtoCLIPLoss(method)(out, step_context=StepContext(step=0, epoch=0, batch={"episode_pos": pos}))
    st = method.state
    l_it = spec_proto_loss(out["image_proto_features"], st.image_prototypes, torch.tensor(12.0), st.text_labels[pos],
                           st.text_centroids, 0.5)
    l_ti = spec_proto_loss(out["text_proto_features"], st.text_prototypes, torch.tensor(12.0), st.image_labels[pos],
                           st.image_centroids, 0.5)
    clip = reference.infonce_loss(out["image_features"].double(), out["text_features"].double(), torch.tensor(10.0).double())
    assert float(terms["proto_loss_image"]) == pytest.approx(float(l_it), abs=1e-5)
    assert float(terms["proto_loss_text"]) == pytest.approx(float(l_ti), abs=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(0.7 * clip + 1.3 * 0.5 * (l_it + l_ti)), abs=1e-5)
    assert "proto_loss_external" not in terms  # no --external-teacher


def test_external_terms_use_hard_labels_and_their_weight(tmp_path):
    feats = tmp_path / "teacher.pt"
    torch.save({"keys": ["a"], "features": torch.zeros(1, 3)}, feats)
    method = ProtoCLIPMethod(_params(external_teacher=str(feats), w_proto=0.0, w_proto_external=2.0))
    method.state = _state()
    pos = torch.tensor([1, 2, 5, 6, 8, 10])
    out = _outputs()
    terms = ProtoCLIPLoss(method)(out, step_context=StepContext(step=0, epoch=0, batch={"episode_pos": pos}))
    st = method.state
    y = st.external_labels[pos]
    l_ie = spec_proto_loss(out["image_proto_features"], st.image_external_prototypes, torch.tensor(12.0), y)
    l_te = spec_proto_loss(out["text_proto_features"], st.text_external_prototypes, torch.tensor(12.0), y)
    assert "proto_loss" not in terms
    assert float(terms["proto_loss_external"]) == pytest.approx(float(0.5 * (l_ie + l_te)), abs=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(terms["contrastive_loss"] + 2.0 * terms["proto_loss_external"]), abs=1e-5)


def test_warmup_and_locked_image_epochs_train_clip_only():
    m = ProtoCLIPMethod(_params(infonce_warmup_epoch=1, lit_start_epoch=5, epochs=6, w_clip=0.5))
    assert [m.loss_weights(e)[:2] for e in range(6)] == [(1.0, 0.0), (0.5, 1.0), (0.5, 1.0), (0.5, 1.0), (1.0, 0.0), (1.0, 0.0)]


def test_learning_rates_of_the_locked_image_and_late_text_schedules():
    m = ProtoCLIPMethod(_params(lit_start_epoch=3, text_start_epoch=1, lr_text=0.5, epochs=4))
    m.steps_per_epoch = 10

    def schedule(step, *, base_lr=None, start_step=0, total_steps=None):
        return 0.0 if step < start_step else (base_lr or 1.0) * (1 - (step - start_step) / ((total_steps or 40) - start_step))

    visual, text = {"name": "visual_decay"}, {"name": "text_no_decay"}
    assert m.group_lr(visual, 5, 0, schedule) == pytest.approx(1 - 5 / 20)  # annealed by the LiT start, step 20
    assert m.group_lr(visual, 25, 2, schedule) == 0.0
    assert m.group_lr(text, 5, 0, schedule) == 0.0  # text side frozen for the first epoch
    assert m.group_lr(text, 25, 2, schedule) == pytest.approx(0.5 * (1 - 15 / 30))


def test_param_groups_split_the_image_tower_and_spare_heads_from_decay():
    from pyprotoclip.models import create_model

    m = ProtoCLIPMethod(_params(projection_dim=16, projection_hidden_dim=32))
    model = m.build_model(create_model("tiny-vit")[0])
    groups = {g["name"]: g for g in m.param_groups(model, 0.2)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["text_decay"]["params"]} | {names[id(p)] for p in groups["visual_decay"]["params"]}
    assert not any("projection_head" in n or "logit_scale" in n for n in decay)
    assert all(names[id(p)].startswith("visual.") for g in ("visual_decay", "visual_no_decay") for p in groups[g]["params"])
    assert "logit_scale_proto" in {names[id(p)] for p in groups["text_no_decay"]["params"]}


def test_model_heads_start_equal_and_keep_the_open_clip_keys():
    from pyprotoclip.models import create_model

    base = create_model("tiny-vit", seed=0)[0]
    base_keys = list(base.state_dict())
    model = ProtoCLIPModel(base, heads=True, dim=16, hidden=32, layers=1)
    keys = list(model.state_dict())
    assert keys[: len(base_keys)] == base_keys or set(base_keys) <= set(keys)
    extra = sorted(set(keys) - set(base_keys))
    assert extra and all(k.startswith(("image_projection_head", "text_projection_head")) or k == "logit_scale_proto" for k in extra)
    for (a, x), (b, y) in zip(model.image_projection_head.state_dict().items(), model.text_projection_head.state_dict().items()):
        assert torch.equal(x, y), a
    assert float(model.logit_scale_proto.detach()) == pytest.approx(math.log(1 / 0.07))
    model.eval()
    out = model(torch.randn(2, 3, 64, 64), torch.randint(1, 100, (2, 32)))
    z = base.encode_image(torch.randn(1, 3, 64, 64))
    assert out["image_proto_features"].shape == (2, 16) and z.shape[-1] == out["image_features"].shape[-1]
    torch.testing.assert_close(out["image_proto_features"].norm(dim=1), torch.ones(2))


def test_bad_flags_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="num-prototypes"):
        ProtoCLIPMethod.check_params(_params(num_prototypes=100, episode_size=50))
    with pytest.raises(ValueError, match="external-teacher"):
        ProtoCLIPMethod.check_params(_params(external_teacher=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="kmeans-max-iter"):
        ProtoCLIPMethod.check_params(_params(kmeans_max_iter=0))
    with pytest.raises(ValueError, match="w-proto"):
        ProtoCLIPMethod.check_params(_params(w_proto=-1.0))


# ---- multi-rank: DDP-averaged gradients equal the single-process gradient of the spec's loss ---------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ddp_gradients_equal_the_single_process_gradient(tmp_path, world):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(world), "PYTHONPATH": os.pathsep.join([os.getcwd(), HERE])}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_protoclip_ddp_worker.py"), str(tmp_path)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    got = torch.load(tmp_path / "grads.pt", weights_only=True)
    sys.path.insert(0, HERE)
    from _protoclip_ddp_worker import single_process_grads

    want = single_process_grads(world)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
