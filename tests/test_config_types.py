"""Method configs: field types checked by one pydantic ``TypeAdapter`` per class (issue 19).

Every option of every built-in method config refuses a value of the wrong type with one
:class:`RecipeError` line naming the method, the option, what it got and what it takes.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from llmpress.errors import RecipeError
from llmpress.plugin_manager import make_plugin_manager
from llmpress.recipe.config import MethodConfig, expects

PM = make_plugin_manager()
CONFIGS: dict[str, type[MethodConfig]] = {name: info.config_cls for name, info in sorted(PM.methods.items())}
OPTIONS = [(m, o) for m, cls in CONFIGS.items() for o in cls.field_names()]
#: wrong for every option type: bytes is no string, number, flag, list or mapping
WRONG = b"wrong"


def test_every_built_in_method_has_options_to_check() -> None:
    assert {"wanda", "sparsegpt", "gptq", "rtn", "flap", "evopress", "drop_blocks"} <= set(CONFIGS)
    assert len(OPTIONS) > 40


@pytest.mark.parametrize(("method", "option"), OPTIONS, ids=[f"{m}.{o}" for m, o in OPTIONS])
def test_wrong_type_names_the_option(method: str, option: str) -> None:
    cls = CONFIGS[method]
    with pytest.raises(RecipeError) as e:
        cls.from_dict({option: WRONG})
    message = str(e.value)
    assert "\n" not in message
    assert re.fullmatch(rf"{re.escape(cls.label())}: {option} must be .+, got b'wrong'", message), message


def test_strict_types() -> None:
    wanda, gptq, flap = CONFIGS["wanda"], CONFIGS["gptq"], CONFIGS["flap"]
    assert wanda(sparsity=0).sparsity == 0  # an int is a number
    for bad in ("0.5", True):
        with pytest.raises(RecipeError, match=r"method 'wanda': sparsity must be a number, got"):
            wanda(sparsity=bad)
    with pytest.raises(RecipeError, match=r"blocksize must be an integer >= 1, got True"):
        gptq(blocksize=True)  # True is no integer
    with pytest.raises(RecipeError, match=r"symmetric must be true or false, got 1"):
        gptq(symmetric=1)
    with pytest.raises(RecipeError, match=r"head_mode must be 'auto', 'query' or 'group', got 'heads'"):
        flap(head_mode="heads")
    with pytest.raises(RecipeError, match=r"structures must be a list of strings, got 'heads'"):
        flap(structures="heads")


def test_first_bad_option_only() -> None:
    with pytest.raises(RecipeError) as e:
        CONFIGS["gptq"](bits="4", group_size="128")
    assert str(e.value) == "method 'gptq': bits must be an integer from 2 to 8, got '4'"


def test_lists_become_tuples_and_items_are_checked() -> None:
    evo = CONFIGS["evopress"](tokens=[64, 128], survivors=[2])
    assert evo.tokens == (64, 128) and evo.survivors == (2,)
    assert hash(evo) == hash(CONFIGS["evopress"](tokens=(64, 128), survivors=(2,)))
    with pytest.raises(
        RecipeError, match=r"allocation 'evopress': bits must be a list of integers from 2 to 8"
    ):
        CONFIGS["evopress"](bits=[2, 9])
    with pytest.raises(RecipeError, match=r"tokens must be a list of integers >= 1, got \[64, True\]"):
        CONFIGS["evopress"](tokens=[64, True], survivors=[2])


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_defaults_round_trip(method: str) -> None:
    cls = CONFIGS[method]
    cfg = cls(sparsity=0.5) if "sparsity" in cls.field_names() else cls()
    again = cls.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.to_dict() == cfg.to_dict()
    if method != "explicit":  # explicit holds a dict (unhashable)
        assert hash(again) == hash(cfg)


def test_replace_checks_types_too() -> None:
    cfg = CONFIGS["sparsegpt"](sparsity=0.5)
    assert dataclasses.replace(cfg, percdamp=0.1).percdamp == 0.1
    with pytest.raises(RecipeError, match=r"percdamp must be a number in \[0, 10\), got 'x'"):
        dataclasses.replace(cfg, percdamp="x")


def test_schema_is_built_once_per_class() -> None:
    wanda, sparsegpt = CONFIGS["wanda"], CONFIGS["sparsegpt"]
    wanda(sparsity=0.5)
    schema = wanda._schema()
    wanda(sparsity=0.25)
    assert wanda._schema() is schema and wanda.__dict__["_llmpress_schema"] is schema
    assert sparsegpt._schema() is not schema and "percdamp" in sparsegpt._schema().hints


def test_expects_in_words() -> None:
    hints = CONFIGS["uniform"]._schema().hints
    assert expects(hints["metric"]) == "'kl' or 'ppl'"
    assert expects(hints["sparsity_step"]) == "a number in (0, 1]"
    assert expects(hints["average"]) == "a number"
    assert expects(CONFIGS["explicit"]._schema().hints["levels"]) == "a mapping of strings to numbers"
