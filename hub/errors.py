"""Errors of the publishing layer; each message names the problem and the fix."""

from __future__ import annotations

from llmpress.errors import EvalTaskError, LlmpressError

# EvalTaskError belongs to core's evaluation (llmpress.cli.eval_harness); re-exported for hub users.
__all__ = ["CardTemplateError", "EvalTaskError", "PublishError"]


class PublishError(LlmpressError):
    """Pushing to or pulling from the Hub failed (authentication, repo name, network, server), or a
    push was refused before anything was sent (a folder without weights, a card whose evaluation
    results hold NaN/inf).

    Nothing is left half-published: a Hub commit is atomic, so re-running the same push
    after fixing the cause completes it (files already uploaded through LFS are skipped).
    """


class CardTemplateError(LlmpressError, ValueError):
    """A model card template cannot be parsed or rendered; the message names the file and line."""
