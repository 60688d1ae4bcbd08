"""llmpress.hub: publishing compressed models to the Hugging Face Hub, and a local Hub for tests.

Public API (imported lazily; importing ``llmpress.hub`` loads nothing heavy)::

    from llmpress.hub import push, pull, attach_card, build_card, evaluate

    llmpress.hub.evaluate(model, tok, tasks=["hellaswag"], limit=100, save_to="out")  # llmpress_eval.json
    url = llmpress.hub.push("out", "me/tiny-wanda").repo_url  # folder + README.md card, one commit
    model, tok = llmpress.hub.pull("me/tiny-wanda")
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "push",
    "pull",
    "attach_card",
    "repo_url",
    "build_card",
    "build_card_context",
    "render_card",
    "write_card",
    "method_citations",
    "evaluate",
    "run_lm_eval",
    "load_eval",
    "save_eval",
    "EvalRecord",
    "PublishError",
    "CardTemplateError",
    "EvalTaskError",
]

_HOME = {
    "push": "publish",
    "pull": "publish",
    "attach_card": "publish",
    "repo_url": "publish",
    "build_card": "card",
    "build_card_context": "card",
    "render_card": "card",
    "write_card": "card",
    "method_citations": "card",
    "evaluate": "eval_harness",
    "run_lm_eval": "eval_harness",
    "load_eval": "eval_harness",
    "save_eval": "eval_harness",
    "EvalRecord": "eval_harness",
    "PublishError": "errors",
    "CardTemplateError": "errors",
    "EvalTaskError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"llmpress.hub.{_HOME[name]}"), name)
    raise AttributeError(f"module 'llmpress.hub' has no attribute {name!r}")
