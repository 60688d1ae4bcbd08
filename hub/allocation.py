"""The allocation section of a model card: the search's choice per unit and its fitness curve."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FITNESS_PLOT_FILE = "llmpress_fitness.png"
_KIND_LABEL = {"sparsity": "sparsity", "bits": "bits", "blocks": "dropped"}


def fitness_plot(history: list[float], out: Path, label: str) -> Path | None:
    """Save the best fitness after each generation/step as a PNG (``None`` if < 2 points)."""
    if len(history) < 2:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(range(1, len(history) + 1), history, marker="o", markersize=3)
    ax.set_xlabel("generation / step")
    ax.set_ylabel(label)
    ax.set_title("Allocation search: best fitness")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png", bbox_inches="tight", metadata={"Software": None})
    return out


def allocation_context(alloc: dict[str, Any] | None, folder: Path, write_plot: bool) -> dict[str, Any] | None:
    """Template variables of the allocation section (``alloc``: the report's ``allocation``), or
    ``None`` when no search ran."""
    if not isinstance(alloc, dict) or not isinstance(alloc.get("levels"), dict):
        return None
    kind = str(alloc.get("kind", ""))
    searched = alloc.get("searched_with") or {}
    metric = "KL divergence to the dense model" if alloc.get("metric", "kl") == "kl" else "calibration NLL"
    plot = None
    history = [float(h) for h in alloc.get("history") or []]
    if write_plot:
        try:
            plot = FITNESS_PLOT_FILE if fitness_plot(history, folder / FITNESS_PLOT_FILE, metric) else None
        except OSError as e:  # pragma: no cover - read-only folder
            log.warning("could not write the fitness plot into %s (%s)", folder, e)
    rows = [
        {
            "unit": u,
            "level": ("dropped" if v else "kept")
            if kind == "blocks"
            else (f"{100 * v:.1f} %" if kind == "sparsity" else f"{v:g}"),
        }
        for u, v in alloc["levels"].items()
    ]
    fitness = alloc.get("fitness")
    return {
        "method": alloc.get("method") or searched.get("method"),
        "kind": _KIND_LABEL.get(kind, kind),
        "target": alloc.get("target"),
        "metric": metric,
        "fitness": "-" if fitness is None else f"{float(fitness):.5g}",
        "evaluations": alloc.get("evaluations", 0),
        "search_s": alloc.get("search_s", 0.0),
        "rows": rows,
        "dropped": alloc.get("dropped") or [],
        "plot": plot,
    }
