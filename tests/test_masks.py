"""Mask selection: exact per-row / per-layer counts, exact N:M structure, stable tie-breaking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import is_nm_sparse

from llmpress.errors import ModelError, RecipeError
from llmpress.math.masks import check_nm_divides, nm_mask, select_mask, unstructured_mask
from llmpress.math.targets import SparsityTarget, parse_pattern
from llmpress.plugins import masking
from llmpress.plugins.wanda import WandaConfig

SETTINGS = settings(max_examples=40, deadline=None, database=None)


def _scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- unstructured


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 70), st.floats(0.0, 0.99), st.integers(0, 2**31 - 1))
def test_row_mask_prunes_exactly_the_lowest_of_each_row(
    rows: int, cols: int, sparsity: float, seed: int
) -> None:
    s = _scores(rows, cols, seed)
    keep = unstructured_mask(s, sparsity, "row")
    assert keep.dtype == torch.bool and keep.shape == s.shape
    k = int(cols * sparsity)
    assert ((~keep).sum(1) == k).all()
    for r in range(rows):
        if 0 < k < cols:
            assert s[r][~keep[r]].max() <= s[r][keep[r]].min()


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 70), st.floats(0.0, 0.99), st.integers(0, 2**31 - 1))
def test_layer_mask_prunes_exactly_the_lowest_of_the_layer(
    rows: int, cols: int, sparsity: float, seed: int
) -> None:
    s = _scores(rows, cols, seed)
    keep = unstructured_mask(s, sparsity, "layer")
    k = int(rows * cols * sparsity)
    assert int((~keep).sum()) == k
    if 0 < k < rows * cols:
        assert s[~keep].max() <= s[keep].min()


def test_layer_mode_is_not_per_row() -> None:
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert unstructured_mask(s, 0.5, "layer").tolist() == [
        [False, False, False, False],
        [True, True, True, True],
    ]
    assert unstructured_mask(s, 0.5, "row").tolist() == [
        [False, False, True, True],
        [False, False, True, True],
    ]


def test_exact_count_for_awkward_sizes() -> None:
    s = _scores(7, 33, 0)
    assert ((~unstructured_mask(s, 0.5, "row")).sum(1) == 16).all()  # int(33 * 0.5)
    assert int((~unstructured_mask(s, 0.5, "layer")).sum()) == 115  # int(231 * 0.5)
    assert unstructured_mask(s, 0.0, "row").all()


def test_unknown_group_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown comparison group 'column'"):
        unstructured_mask(_scores(2, 4, 0), 0.5, "column")


# ------------------------------------------------------------------------------------- N:M


@SETTINGS
@given(
    st.integers(1, 10),
    st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (5, 16)]),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
)
def test_nm_mask_keeps_exactly_n_highest_of_every_m(
    rows: int, nm: tuple[int, int], groups: int, seed: int
) -> None:
    n, m = nm
    s = _scores(rows, m * groups, seed)
    keep = nm_mask(s, n, m)
    g_keep = keep.view(rows, groups, m)
    assert (g_keep.sum(-1) == n).all()
    assert is_nm_sparse(s * keep, n, m)
    g_s = s.view(rows, groups, m)
    kept_min = torch.where(g_keep, g_s, torch.inf).amin(-1)
    pruned_max = torch.where(~g_keep, g_s, -torch.inf).amax(-1)
    assert (pruned_max <= kept_min).all()


def test_nm_mask_needs_divisible_columns() -> None:
    with pytest.raises(ModelError, match="in_features=6 is not a multiple of 4"):
        nm_mask(_scores(2, 6, 0), 2, 4)
    with pytest.raises(ModelError, match="does not divide my.layer"):
        check_nm_divides(10, 4, 8, "my.layer")
    check_nm_divides(16, 4, 8)


def test_is_nm_sparse() -> None:
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0]])
    assert is_nm_sparse(w, 2, 4)
    assert not is_nm_sparse(w, 1, 4)
    assert is_nm_sparse(w, 4, 8)
    assert not is_nm_sparse(torch.ones(2, 8), 2, 4)
    assert is_nm_sparse(torch.zeros(2, 8), 2, 4)  # at most N nonzeros
    assert not is_nm_sparse(torch.zeros(2, 6), 2, 4)  # does not tile
    # groups run along the input dimension, not across rows
    col = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert is_nm_sparse(col, 2, 4) and not is_nm_sparse(col.t().contiguous().view(2, 4), 2, 4)


# ---------------------------------------------------------------------------- tie-breaking


def test_ties_prune_lower_index_first_per_row() -> None:
    keep = unstructured_mask(torch.ones(3, 8), 0.5, "row")
    assert (keep[:, :4] == 0).all() and keep[:, 4:].all()
    s = torch.tensor([[5.0, 1.0, 1.0, 1.0, 1.0, 9.0]])  # four-way tie, two to prune
    assert unstructured_mask(s, 0.5, "row").tolist() == [[True, False, False, False, True, True]]


def test_ties_prune_lower_index_first_per_layer() -> None:
    keep = unstructured_mask(torch.ones(2, 4), 0.5, "layer")
    assert keep.tolist() == [[False, False, False, False], [True, True, True, True]]


def test_ties_prune_lower_index_first_nm() -> None:
    keep = nm_mask(torch.ones(2, 8), 2, 4)
    assert keep.tolist() == [[False, False, True, True] * 2] * 2
    s = torch.tensor([[3.0, 1.0, 1.0, 1.0]])
    assert nm_mask(s, 2, 4).tolist() == [[True, False, False, True]]


def test_tie_breaking_is_stable_on_large_rows() -> None:
    """Many ties in a long row (like fp16 weights): the pruned set is the stable-sort prefix."""
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 8, (4, 1024), generator=g).float()  # heavy ties
    keep = unstructured_mask(s, 0.5, "row")
    expected = torch.ones_like(keep)
    expected.scatter_(1, torch.sort(s, dim=1, stable=True).indices[:, :512], False)
    assert torch.equal(keep, expected)


# -------------------------------------------------------------------- dispatch and patterns


def test_select_mask_dispatches_on_the_target() -> None:
    s = _scores(4, 16, 1)
    assert torch.equal(select_mask(s, SparsityTarget(0.5, (2, 4))), nm_mask(s, 2, 4))
    assert torch.equal(select_mask(s, SparsityTarget(0.25)), unstructured_mask(s, 0.25, "row"))
    assert torch.equal(
        select_mask(s, SparsityTarget(0.25, group="layer")), unstructured_mask(s, 0.25, "layer")
    )
    assert SparsityTarget(0.5, (2, 4)).pattern == "2:4" and SparsityTarget(0.5).pattern == "unstructured"


def test_masking_plugin_defaults() -> None:
    cfg = WandaConfig(sparsity=0.5)
    s = _scores(4, 8, 2)
    keep = masking.llmpress_select_mask(scores=s, target=cfg.sparsity_target(), config=cfg)
    assert ((~keep).sum(1) == 4).all()
    with pytest.raises(ValueError, match=r"per-weight scores \[out, in\], got shape \(8,\)"):
        masking.llmpress_select_mask(scores=s[0], target=cfg.sparsity_target(), config=cfg)
    layer = torch.nn.Linear(8, 4)
    assert masking.llmpress_update_weights(module=layer, mask=None, stats=None, config=cfg) is None
    new = masking.llmpress_update_weights(module=layer, mask=keep, stats=None, config=cfg)
    assert new.weight is None and torch.equal(new.mask, keep)  # the engine zeroes on commit


@pytest.mark.parametrize(
    ("text", "nm"),
    [
        ("unstructured", None),
        ("Unstructured ", None),
        ("2:4", (2, 4)),
        (" 4 : 8 ", (4, 8)),
        ("1:2", (1, 2)),
        ("15:16", (15, 16)),
    ],
)
def test_parse_pattern(text: str, nm: tuple[int, int] | None) -> None:
    assert parse_pattern(text) == nm


@pytest.mark.parametrize("bad", ["3-4", "2/4", "2:", ":4", "a:b", "4:2", "0:4", "2:2", "", "dense"])
def test_parse_pattern_rejects(bad: str) -> None:
    with pytest.raises(RecipeError, match="pattern"):
        parse_pattern(bad)


def test_parse_pattern_rejects_non_strings() -> None:
    with pytest.raises(RecipeError, match="pattern must be a string"):
        parse_pattern(124)  # type: ignore[arg-type]
