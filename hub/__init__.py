"""llmpress.hub: publishing compressed models to the Hugging Face Hub.

Public API (imported lazily; importing ``llmpress.hub`` loads nothing heavy)::

    from llmpress.hub import push, push_model, pull, build_card, evaluate

    llmpress.hub.evaluate(model, tok, tasks=["hellaswag"], limit=100, save_to="out")  # llmpress_eval.json
    url = llmpress.hub.push("out", "me/tiny-wanda").repo_url  # folder + README.md card, one commit
    llmpress.hub.push_model(model, "me/tiny-wanda", result, tokenizer=tok)  # an in-memory model
    model, tok = llmpress.hub.pull("me/tiny-wanda")

Evaluation lives in core (:mod:`llmpress.cli.eval_harness`); ``evaluate``, ``run_lm_eval``,
``load_eval``, ``save_eval``, ``EvalRecord`` and ``EvalTaskError`` are re-exported here.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "push",
    "pull",
    "push_model",
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
    "push": "llmpress.hub.publish",
    "pull": "llmpress.hub.publish",
    "push_model": "llmpress.hub.publish",
    "build_card": "llmpress.hub.card",
    "build_card_context": "llmpress.hub.card",
    "render_card": "llmpress.hub.card",
    "write_card": "llmpress.hub.card",
    "method_citations": "llmpress.hub.card",
    "evaluate": "llmpress.cli.eval_harness",
    "run_lm_eval": "llmpress.cli.eval_harness",
    "load_eval": "llmpress.cli.eval_harness",
    "save_eval": "llmpress.cli.eval_harness",
    "EvalRecord": "llmpress.cli.eval_harness",
    "PublishError": "llmpress.hub.errors",
    "CardTemplateError": "llmpress.hub.errors",
    "EvalTaskError": "llmpress.errors",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'llmpress.hub' has no attribute {name!r}")
