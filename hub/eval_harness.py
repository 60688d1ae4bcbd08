"""Evaluation moved to core (:mod:`llmpress.eval_harness`); these names stay importable from here.

New code imports from :mod:`llmpress.eval_harness` (or ``llmpress.hub.evaluate`` & co, which
:mod:`llmpress.hub` re-exports lazily).
"""

from __future__ import annotations

from llmpress.eval_harness import (
    EVAL_FILE,
    EvalRecord,
    evaluate,
    load_eval,
    perplexity_record,
    run_lm_eval,
    save_eval,
    task_manager,
)

__all__ = [
    "EVAL_FILE",
    "EvalRecord",
    "evaluate",
    "load_eval",
    "perplexity_record",
    "run_lm_eval",
    "save_eval",
    "task_manager",
]
