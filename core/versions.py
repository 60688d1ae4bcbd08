"""Versions recorded in saved artifacts."""

from __future__ import annotations

from importlib import metadata


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    """llmpress, torch and transformers versions."""
    return {n: package_version(n) for n in ("llmpress", "torch", "transformers")}
