"""Projection heads: the MLP that maps a tower's embedding into the prototype space (ProtoCLIP)."""

from __future__ import annotations

import torch


def projection_head(in_dim: int, out_dim: int = 128, hidden_dim: int = 2048, n_layers: int = 1) -> torch.nn.Sequential:
    """Linear(in, H) -> BatchNorm1d(H) -> ReLU, then (n_layers - 1) x [Linear(H, H) -> BN -> ReLU], then
    Linear(H, out). ``n_layers = 0``: a single Linear(in, out). Input (B, in_dim), output (B, out_dim)."""
    if n_layers < 0:
        raise ValueError(f"projection-n-layers: expected an int >= 0, got {n_layers}")
    if n_layers == 0:
        return torch.nn.Sequential(torch.nn.Linear(in_dim, out_dim))
    layers: list[torch.nn.Module] = []
    width = in_dim
    for _ in range(n_layers):
        layers += [torch.nn.Linear(width, hidden_dim), torch.nn.BatchNorm1d(hidden_dim), torch.nn.ReLU(inplace=True)]
        width = hidden_dim
    layers.append(torch.nn.Linear(width, out_dim))
    return torch.nn.Sequential(*layers)
