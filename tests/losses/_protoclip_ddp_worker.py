"""One rank of the ProtoCLIP multi-process gradient test (gloo), and the float64 single-process oracle.

Two linear "towers" and a learnable prototype scale; each rank takes its B rows of a fixed global batch,
computes ProtoCLIP's prototype terms (soft image<-text, soft text<-image, hard external) with
pyprotoclip.losses.ProtoLoss, and DDP averages the gradients. Rank 0 saves them."""

import math
import os
import sys

import torch
import torch.nn.functional as F

B, D_IN, D, K, TAU_T = 4, 5, 6, 7, 0.5


class Towers(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.image = torch.nn.Parameter(torch.randn(D, D_IN, generator=g).to(dtype))
        self.text = torch.nn.Parameter(torch.randn(D, D_IN, generator=g).to(dtype))
        self.logit_scale_proto = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=dtype))

    def forward(self, x_image, x_text):
        return (F.normalize(x_image @ self.image.t(), dim=1), F.normalize(x_text @ self.text.t(), dim=1),
                self.logit_scale_proto.exp())


def global_batch(world):
    g = torch.Generator().manual_seed(5)
    n = world * B
    return {
        "x_image": torch.randn(n, D_IN, generator=g), "x_text": torch.randn(n, D_IN, generator=g),
        "y_image": torch.randint(K, (n,), generator=g), "y_text": torch.randint(K, (n,), generator=g),
        "y_external": torch.randint(K, (n,), generator=g),
        "image_prototypes": torch.randn(K, D, generator=g), "text_prototypes": torch.randn(K, D, generator=g),
        "external_prototypes": torch.randn(K, D, generator=g),
        "image_centroids": torch.randn(K, D, generator=g), "text_centroids": torch.randn(K, D, generator=g),
    }


def _spec_term(h, protos, s, labels, centroids=None):
    a = s * h @ protos.t()
    q = torch.softmax(centroids[labels] @ centroids.t() / TAU_T, 1) if centroids is not None else F.one_hot(labels, K).double()
    return (torch.logsumexp(a, 1) - (q * a).sum(1)).mean()


def single_process_grads(world):
    """Gradients of the spec's loss on the concatenated batch, float64, computed directly."""
    data = {k: v.double() if v.is_floating_point() else v for k, v in global_batch(world).items()}
    model = Towers(torch.float64)
    h_i, h_t, s = model(data["x_image"], data["x_text"])
    loss = (_spec_term(h_i, data["image_prototypes"], s, data["y_text"], data["text_centroids"])
            + _spec_term(h_t, data["text_prototypes"], s, data["y_image"], data["image_centroids"])
            + _spec_term(h_i, data["external_prototypes"], s, data["y_external"]))
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def main(out_dir):
    import torch.distributed as dist

    from pyprotoclip.losses import ProtoLoss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = global_batch(world)
    mine = slice(rank * B, (rank + 1) * B)
    model = torch.nn.parallel.DistributedDataParallel(Towers())
    h_i, h_t, s = model(data["x_image"][mine], data["x_text"][mine])
    soft, hard = ProtoLoss(TAU_T), ProtoLoss(0.0)
    loss = (soft(h_i, data["image_prototypes"], s, data["y_text"][mine], data["text_centroids"])
            + soft(h_t, data["text_prototypes"], s, data["y_image"][mine], data["image_centroids"])
            + hard(h_i, data["external_prototypes"], s, data["y_external"][mine]))
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, os.path.join(out_dir, "grads.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
