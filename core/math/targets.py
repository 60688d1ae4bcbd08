"""Sparsity targets and ``N:M`` pattern parsing."""

from __future__ import annotations

import dataclasses
import re

from llmpress.errors import RecipeError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> ``None``; ``"2:4"`` -> ``(2, 4)`` (N kept of every M)."""
    if not isinstance(pattern, str):
        raise RecipeError(f"pattern must be a string like 'unstructured' or '2:4', got {pattern!r}")
    if pattern.strip().lower() == "unstructured":
        return None
    m = _NM.match(pattern)
    if not m:
        raise RecipeError(
            f"unknown sparsity pattern {pattern!r}; use 'unstructured' or 'N:M' such as '2:4' "
            f"(N weights kept in every M consecutive input weights)"
        )
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise RecipeError(f"pattern {pattern!r}: need 0 < N < M (N kept of every M), e.g. '2:4'")
    return n, mm


@dataclasses.dataclass(frozen=True)
class SparsityTarget:
    """What a mask must achieve.

    ``sparsity``: fraction pruned. ``nm``: ``(N, M)`` keep-N-of-M structure along the input
    dimension, or ``None`` for unstructured. ``group``: the comparison group for
    unstructured selection, ``"row"`` (each output row pruned to exactly ``sparsity``) or
    ``"layer"`` (one threshold over the whole layer).
    """

    sparsity: float
    nm: tuple[int, int] | None = None
    group: str = "row"

    @property
    def pattern(self) -> str:
        return "unstructured" if self.nm is None else f"{self.nm[0]}:{self.nm[1]}"
