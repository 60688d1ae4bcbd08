"""The ``llmpress`` command line: the parser, ``plugins`` and ``demo``, and the entry point that turns a
user's mistake into one ``error:`` line. ``compress`` and ``eval`` have a module each."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from llmpress.cli import compress_command, eval_command
from llmpress.errors import LlmpressError

#: ``llmpress plugins``: the heading of each of :meth:`Llmpress.sections`, and what a row lists
_SECTIONS = {
    "stage_methods": ("Stage methods (a recipe stage's `method:`)", "methods"),
    "allocation_searches": ("Allocation searches (a stage's `allocation: {method: ...}`)", "methods"),
    "kernels": (
        "Kernels and export targets (picked per packed layer at load; LLMPRESS_KERNEL=name)",
        "kernels",
    ),
    "general": ("General plugins (hooks called for every method)", "hooks"),
}


def _plugins(a: argparse.Namespace) -> int:
    """``llmpress plugins``: the plugins by kind, or JSON."""
    from llmpress.plugin_manager import get_plugin_manager

    pm = get_plugin_manager()
    sections = pm.sections()
    if a.json:  # default: the flat {plugin: [methods]} of earlier versions; --sections: by kind
        print(json.dumps(sections if a.sections else pm.plugins(), indent=2))
        return 0
    width = max((len(n) for rows in sections.values() for n in rows), default=10)
    for key, rows in sections.items():
        if not rows:
            continue
        heading, what = _SECTIONS[key]
        print(f"{heading}:")
        for name, names in sorted(rows.items()):
            print(f"{name:<{width}}  {pm.plugin_origin(name):<28} {what}: {', '.join(names) or '-'}")
    return 0


def _demo(a: argparse.Namespace) -> int:
    """``llmpress demo``: train a small model, compress it every way, print the table."""
    from llmpress.cli.demo import format_legend, format_orderings, format_table, run_demo

    result = run_demo(a.out, steps=a.steps, cache=not a.no_cache, threads=a.threads or None)
    print(format_table(result.rows))
    print(f"\n{format_legend(result)}\n\n{format_orderings(result.rows)}")
    kept = (
        "" if a.out else " (a new temporary folder, kept: delete it when done, or choose one with --out DIR)"
    )
    print(f"\nresults:    {result.out}{kept}\nmodel card: {result.card}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``llmpress`` parser: global options, then one subcommand each."""
    p = argparse.ArgumentParser(prog="llmpress", description="Compress Hugging Face models with plugins.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument(
        "-p",
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE and register it as a plugin (repeatable; also $LLMPRESS_PLUGINS)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    compress_command.add_parser(sub)
    eval_command.add_parser(sub)
    _add_other_commands(sub)
    return p


def _add_other_commands(sub: argparse._SubParsersAction) -> None:
    """``push`` (the Hub layer's), ``plugins`` and ``demo``."""
    from llmpress.hub import cli as hub_cli  # argparse only; the Hub client loads when `push` runs

    pu = sub.add_parser("push", help="publish a saved model folder and its model card to the Hub")
    hub_cli.add_push_arguments(pu)
    pu.set_defaults(func=hub_cli.push_command)

    pl = sub.add_parser("plugins", help="list plugins: stage methods, allocation searches, kernels")
    pl.add_argument("--json", action="store_true", help="print JSON: {plugin: [methods]}")
    pl.add_argument(
        "--sections",
        action="store_true",
        help="with --json: {stage_methods|allocation_searches|kernels|general: {plugin: [names]}}",
    )
    pl.set_defaults(func=_plugins)

    d = sub.add_parser("demo", help="train a small model, compress it every way, evaluate, save and reload")
    d.add_argument(
        "--out", default=None, help="write the results here (default: a new temporary folder, kept)"
    )
    d.add_argument("--steps", type=int, default=None, help="training steps of the demo model")
    d.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    d.add_argument("--no-cache", action="store_true", help="train the demo model even if it is cached")
    d.set_defaults(func=_demo)


def main(argv: list[str] | None = None) -> int:
    """Run ``llmpress``; a user's mistake prints one ``error:`` line and returns 2."""
    args = build_parser().parse_args(argv)
    worker = os.environ.get("RANK", "0") != "0"  # torchrun: the other ranks log warnings only
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if worker else logging.INFO,
        format=(f"[rank {os.environ['RANK']}] " if worker else "") + "%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.plugin:
            from llmpress.plugin_manager import get_plugin_manager

            pm = get_plugin_manager()
            for mod in args.plugin:
                if pm.pm.get_plugin(mod) is None:
                    pm.register(_import_plugin(mod), name=mod)
        return int(args.func(args) or 0)
    except (LlmpressError, FileExistsError, FileNotFoundError, PermissionError, NotADirectoryError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130


def _import_plugin(module: str) -> object:
    """The module ``--plugin MODULE`` names, or :class:`LlmpressError`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LlmpressError(f"cannot import plugin module {module!r} (--plugin): {e}") from e


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
