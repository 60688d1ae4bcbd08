"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
REF_LM = SHARED / "ref-lm"


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as a Markdown table; columns are (key, header, format)."""
    print("| " + " | ".join(h for _, h, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else format(v, fmt) if fmt else str(v))
        print("| " + " | ".join(cells) + " |")


def compare_to_reference(rows: list[dict], tolerance_pct: float) -> None:
    """Add ``delta`` (% vs ``ref``) and ``ok`` (within ``tolerance_pct``, or below) to each row."""
    for r in rows:
        ref = r.get("ref")
        r["delta"] = 100 * (r["ppl"] / ref - 1) if ref else None
        r["ok"] = "-" if r["delta"] is None else ("yes" if r["delta"] <= tolerance_pct else "NO")
