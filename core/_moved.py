"""Import paths of modules that moved into subpackages in core v3 (December 2026).

``import llmpress.loading`` (a path the README documented before the split) still gives
:mod:`llmpress.format.loading`, with a ``DeprecationWarning`` naming the new path. The table is
the one place old paths live; nothing inside llmpress uses them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

#: old dotted path -> new dotted path (the modules a README or tutorial could name)
MOVED = {
    f"llmpress.{old}": f"llmpress.{new}"
    for old, new in {
        "loading": "format.loading",
        "evaluate": "cli.evaluate",
        "eval_harness": "cli.eval_harness",
        "demo": "cli.demo",
        "budget": "cli.budget",
        "optimum": "cli.optimum",
        "runtime": "format.runtime",
        "formats": "format.formats",
        "save": "format.save",
        "checkpoint": "format.checkpoint",
        "hf_quantizer": "format.hf_quantizer",
        "compressed_tensors": "format.compressed_tensors",
        "modules": "model.modules",
        "results": "model.results",
        "report": "model.report",
        "config": "recipe.config",
        "pipeline": "pipeline.compress",
    }.items()
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the module at its new path (the same module object)."""

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is already executed."""


def install() -> None:
    """Add the finder once (``import llmpress`` calls this)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
