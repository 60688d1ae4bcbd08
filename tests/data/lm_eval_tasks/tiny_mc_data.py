"""Loader of the local ``tiny_mc`` task: the JSONL file next to this module (no download)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load(**kwargs: Any) -> Any:
    """lm-eval ``custom_dataset``: a ``DatasetDict`` with one ``test`` split."""
    import datasets

    path = Path(__file__).with_name("tiny_mc.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
