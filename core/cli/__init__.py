"""The command line and what sits on top of the pipeline: the parser and entry point (``main``),
one module per large command (``compress_command``, ``eval_command``) and what they share
(``options``), the demo (``demo``), evaluation (``evaluate``, ``eval_harness``), memory budgets
(``budget``) and the optimum integration (``optimum``)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The ``llmpress`` command (see :mod:`llmpress.cli.main`)."""
    from llmpress.cli.main import main as run

    return run(argv)
