"""``drop_blocks``: remove whole blocks (or attention/MLP sub-blocks) chosen by the stage's
``allocation:`` (shortgpt by default, sleb, evopress). The core does the work
(:mod:`llmpress.structure.dropping`); this plugin registers the method."""

from __future__ import annotations

from llmpress import hookimpl
from llmpress.recipe.allocation import DropBlocksConfig


@hookimpl
def llmpress_register_methods(register) -> None:  # noqa: ANN001
    register(DropBlocksConfig)
