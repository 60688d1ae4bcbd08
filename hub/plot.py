"""The per-layer allocation plot of a model card: sparsity (and bits) of every block's layers.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend change)
and saved as a PNG whose bytes depend only on the data, so re-pushing an unchanged model
uploads nothing new.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from llmpress.hub.folder import ModuleStats

log = logging.getLogger(__name__)

_MAX_KINDS = 10  # more layer kinds per block than this: one bar per block (parameter-weighted)


def _series(modules: Sequence[ModuleStats], value: str) -> tuple[list[int], dict[str, list[float]]]:
    """Blocks (x) and, per layer kind, the value of each block (``nan`` where absent)."""
    blocks = sorted({m.block for m in modules if m.block is not None})
    kinds = list(dict.fromkeys(m.kind for m in modules if m.block is not None))
    table: dict[tuple[int, str], ModuleStats] = {(m.block, m.kind): m for m in modules if m.block is not None}

    def get(m: ModuleStats) -> float:
        return 100.0 * m.sparsity if value == "sparsity" else m.bits_per_param

    if len(kinds) > _MAX_KINDS:
        agg: dict[int, list[ModuleStats]] = defaultdict(list)
        for m in modules:
            if m.block is not None:
                agg[m.block].append(m)
        weighted = [sum(get(m) * m.params for m in agg[b]) / sum(m.params for m in agg[b]) for b in blocks]
        return blocks, {"all layers (parameter-weighted)": weighted}
    return blocks, {
        k: [get(table[(b, k)]) if (b, k) in table else float("nan") for b in blocks] for k in kinds
    }


def allocation_plot(
    modules: Sequence[ModuleStats], out: str | Path, *, show_bits: bool = False
) -> Path | None:
    """Save a grouped bar chart of per-layer sparsity (and bits per parameter) to ``out`` (PNG).

    :param modules: the compressed layers (from :meth:`FolderInfo.modules`).
    :param show_bits: add a second panel with the stored bits per parameter of each layer.
    :returns: ``out``, or ``None`` when no layer belongs to a numbered block (nothing to plot).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not any(m.block is not None for m in modules):
        log.info("no per-block layers to plot")
        return None
    panels = [("sparsity", "sparsity (%)")] + ([("bits", "bits / parameter")] if show_bits else [])
    fig = Figure(figsize=(10, 3.2 * len(panels)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (value, label) in zip(axes, panels):
        blocks, series = _series(modules, value)
        width = 0.8 / len(series)
        for i, (kind, ys) in enumerate(series.items()):
            xs = [b - 0.4 + width * (i + 0.5) for b in blocks]
            ax.bar(xs, ys, width=width, label=kind)
        ax.set_ylabel(label)
        ax.set_xticks(blocks)
        ax.grid(axis="y", alpha=0.3)
        if value == "sparsity":
            ax.set_ylim(0, 100)
    axes[-1].set_xlabel("block")
    axes[0].set_title("Per-layer allocation")
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, format="png", bbox_inches="tight", metadata={"Software": None})
    log.info("wrote the allocation plot %s", out)
    return out


def widths_plot(layers: Sequence[dict[str, Sequence[int]]], out: str | Path) -> Path | None:
    """Save a bar chart of each block's heads and MLP neurons kept (structured pruning), as a
    percentage of the dense width, to ``out`` (PNG).

    :param layers: per block, ``{"heads": [before, after], "neurons": [before, after], ...}``
        (the report's ``structure.layers``).
    :returns: ``out``, or ``None`` when there is nothing to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = [k for k in ("heads", "kv_heads", "neurons") if any(k in row for row in layers)]
    if not layers or not kinds:
        return None
    fig = Figure(figsize=(10, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(kinds)
    blocks = list(range(len(layers)))
    for i, kind in enumerate(kinds):
        ys = [
            100.0 * row[kind][1] / row[kind][0] if kind in row and row[kind][0] else float("nan")
            for row in layers
        ]
        ax.bar([b - 0.4 + width * (i + 0.5) for b in blocks], ys, width=width, label=kind.replace("_", " "))
    ax.set_ylabel("kept (% of dense width)")
    ax.set_ylim(0, 105)
    ax.set_xticks(blocks)
    ax.set_xlabel("block")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Per-layer widths after structured pruning")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, format="png", bbox_inches="tight", metadata={"Software": None})
    log.info("wrote the widths plot %s", out)
    return out


def recovery_plot(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    out: str | Path,
    evals: Sequence[tuple[int, float]] = (),
) -> Path | None:
    """Save the loss curve(s) of a recovery (training) stage to ``out`` (PNG).

    :param curves: per loss name (``"loss"``, ``"ce"``, ``"kl"``, ``"squarehead"``), its
        ``(step, value)`` points.
    :param evals: held-out perplexity ``(step, value)`` points, drawn on a second axis.
    :returns: ``out``, or ``None`` when no curve has two points.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {k: list(v) for k, v in curves.items() if len(v) >= 2}
    if not curves:
        log.info("no loss curve to plot")
        return None
    fig = Figure(figsize=(7, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, points in curves.items():
        ax.plot([s for s, _ in points], [v for _, v in points], label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if len(evals) >= 2:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in evals], [v for _, v in evals], "k--o", markersize=3, label="eval perplexity")
        ax2.set_ylabel("held-out perplexity")
        ax2.legend(fontsize="small", loc="upper right")
    ax.legend(fontsize="small", loc="upper center")
    ax.set_title("Recovery training: loss per step")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, format="png", bbox_inches="tight", metadata={"Software": None})
    log.info("wrote the recovery plot %s", out)
    return out
