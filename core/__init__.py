"""llmpress: plugin-based compression of Hugging Face models.

Public API::

    import llmpress
    model, report = llmpress.compress(model, {"stages": [{"method": "wanda", "sparsity": 0.5}]},
                                      "calib.txt", tokenizer=tok)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmpress import _moved
from llmpress.hookspecs import hookimpl, hookspec

if TYPE_CHECKING:
    import torch

    from llmpress.format.formats import ModuleFormat
    from llmpress.kernels.registry import Kernel

__version__ = "0.1.0"


def _plugin_kernels(fmt: ModuleFormat, device: torch.device) -> list[Kernel]:
    """The kernel source of the format layer: the plugins' kernels (the manager is built on first use)."""
    from llmpress.plugin_manager import get_plugin_manager

    return get_plugin_manager().kernels_for(fmt, device)


def _register_with_transformers() -> None:
    # the format layer gets its kernels by injection (it never imports the plugin manager)
    from llmpress.kernels.registry import install_kernel_source

    install_kernel_source(_plugin_kernels)
    # `import llmpress` makes `from_pretrained` load llmpress checkpoints (quant_method "llmpress")
    try:
        from llmpress.format.hf_quantizer import register
    except ImportError:  # pragma: no cover - transformers missing or too old
        return
    register(kernels=_plugin_kernels)


_register_with_transformers()
_moved.install()  # documented pre-v3 paths such as llmpress.loading still import

__all__ = [
    "hookimpl",
    "hookspec",
    "compress",
    "Recipe",
    "Stage",
    "MethodConfig",
    "PruningConfig",
    "get_plugin_manager",
    "perplexity",
    "save_compressed",
    "save_quantized",
    "save_result",
    "to_runtime",
    "load_model",
    "__version__",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy public API, no heavy imports at import time
    if name == "compress":
        from llmpress.pipeline.compress import compress

        return compress
    if name in ("Recipe", "Stage"):
        from llmpress.recipe import recipes as recipe

        return getattr(recipe, name)
    if name in ("MethodConfig", "PruningConfig"):
        from llmpress.recipe import config as configs

        return getattr(configs, name)
    if name == "get_plugin_manager":
        from llmpress.plugin_manager import get_plugin_manager

        return get_plugin_manager
    if name == "perplexity":
        from llmpress.cli.evaluate import perplexity

        return perplexity
    if name in ("save_compressed", "save_quantized", "save_result", "to_runtime"):
        from llmpress.format import save

        return getattr(save, name)
    if name == "load_model":
        from llmpress.format.loading import load_model

        return load_model
    raise AttributeError(f"module 'llmpress' has no attribute {name!r}")
