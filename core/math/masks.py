"""Mask selection math (tensors in, tensors out). A mask is a boolean *keep* mask."""

from __future__ import annotations

import torch

from llmpress.errors import ModelError
from llmpress.math.targets import SparsityTarget


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask pruning the ``k`` lowest entries of each row (stable: lower index first)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        keep.scatter_(-1, idx, False)
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Prune the lowest-scoring ``sparsity`` fraction, per output row or over the layer.

    scores: [out, in] -> keep: [out, in] bool. Per row, each row keeps exactly
    ``in - int(in * sparsity)`` weights; per layer, exactly ``numel - int(numel * sparsity)``.
    """
    if group == "row":
        return _prune_lowest(scores, int(scores.shape[-1] * sparsity))
    if group == "layer":
        flat = scores.reshape(1, -1)
        return _prune_lowest(flat, int(flat.numel() * sparsity)).view_as(scores)
    raise ValueError(f"unknown comparison group {group!r}; use 'row' or 'layer'")


def check_nm_divides(in_features: int, n: int, m: int, name: str = "layer") -> None:
    """Raise a clear error if an ``N:M`` pattern does not tile ``in_features``."""
    if in_features % m:
        raise ModelError(
            f"pattern {n}:{m} does not divide {name}: in_features={in_features} is not a multiple "
            f"of {m}; exclude this module from the stage's targets or use an unstructured pattern"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every ``m`` consecutive input columns.

    scores: [out, in] with in % m == 0 -> keep: [out, in] bool.
    """
    out, cols = scores.shape
    check_nm_divides(cols, n, m)
    groups = scores.reshape(out, cols // m, m)  # [out, in/m, m]
    return _prune_lowest(groups, m - n).reshape(out, cols)


def select_mask(scores: torch.Tensor, target: SparsityTarget) -> torch.Tensor:
    """The default mask selection for any target."""
    if target.nm is not None:
        return nm_mask(scores, *target.nm)
    return unstructured_mask(scores, target.sparsity, target.group)
