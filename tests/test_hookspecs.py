"""The hook contract: documented, typed specs in one module (the six of the design at least),
all named ``llmpress_*``, each with a caller."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pluggy
import pytest

import llmpress
from llmpress import hookspecs

DESIGN_HOOKS = {
    "llmpress_register_methods",
    "llmpress_score_importance",
    "llmpress_select_mask",
    "llmpress_update_weights",
    "llmpress_change_block",
    "llmpress_register_kernels",
}


def _specs() -> dict[str, object]:
    marker = f"{hookspecs.PROJECT}_spec"
    return {n: f for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, marker)}


ALL_SPECS = sorted(_specs())


def _spec_opts(fn: object) -> dict:
    return getattr(fn, f"{hookspecs.PROJECT}_spec")


def test_hookspec_module_lists_the_six_design_hooks() -> None:
    assert set(_specs()) >= DESIGN_HOOKS
    assert all(n.startswith("llmpress_") for n in _specs())


def test_markers_are_the_llmpress_project() -> None:
    assert hookspecs.PROJECT == "llmpress"
    assert llmpress.hookimpl is hookspecs.hookimpl
    assert llmpress.hookspec is hookspecs.hookspec
    assert isinstance(llmpress.hookimpl, pluggy.HookimplMarker)
    assert llmpress.hookimpl.project_name == "llmpress"


def test_pluggy_sees_exactly_the_specs() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    names = {n for n in dir(pm.hook) if not n.startswith("_")}
    assert names == set(_specs())
    assert all(n.startswith("llmpress_") for n in names)
    # nothing in the module looks like a hook but lacks the spec marker
    lookalikes = {
        n for n, f in vars(hookspecs).items() if n.startswith("llmpress_") and inspect.isfunction(f)
    }
    assert lookalikes == names


@pytest.mark.parametrize("name", ALL_SPECS)
def test_spec_is_typed_and_documented(name: str) -> None:
    fn = _specs()[name]
    doc = inspect.getdoc(fn)
    assert doc and len(doc) > 80, f"{name} needs a docstring"
    sig = inspect.signature(fn)
    assert sig.parameters, f"{name} takes no parameters"
    for p in sig.parameters.values():
        assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name}) is not typed"
        assert re.search(rf"\b{p.name}\b", doc), (
            f"{name}'s docstring does not mention its parameter {p.name!r}"
        )
    assert sig.return_annotation is not inspect.Signature.empty, f"{name} has no return annotation"
    assert re.search(r"return", doc, re.IGNORECASE), f"{name}'s docstring does not say what it returns"


@pytest.mark.parametrize("name", ALL_SPECS)
def test_docstring_states_the_firstresult_contract(name: str) -> None:
    fn = _specs()[name]
    doc = inspect.getdoc(fn)
    first = bool(_spec_opts(fn).get("firstresult"))
    negated = re.search(r"\bnot\s+`*firstresult", doc, re.IGNORECASE)
    assert "firstresult" in doc, f"{name}'s docstring does not say whether it is firstresult"
    if first:
        assert not negated, f"{name} is firstresult but its docstring says it is not"
        assert "None" in doc, f"{name} is firstresult: its docstring must say when it returns None"
    else:
        assert negated, f"{name} is not firstresult but its docstring does not say so"


def test_design_hooks_firstresult_contract() -> None:
    first = {n for n, f in _specs().items() if _spec_opts(f).get("firstresult")}
    assert DESIGN_HOOKS & first == DESIGN_HOOKS - {"llmpress_register_methods", "llmpress_register_kernels"}


@pytest.mark.parametrize("name", ALL_SPECS)
def test_every_hook_has_a_caller(name: str) -> None:
    """No speculative specs: each hook is called by the package (outside hookspecs.py)."""
    core = Path(llmpress.__file__).parent
    callers = [
        p
        for p in core.rglob("*.py")
        if p.name != "hookspecs.py" and re.search(rf"(\.{name}\b|\"{name}\")", p.read_text())
    ]
    assert callers, f"nothing in llmpress calls {name}"


def test_module_docstring_describes_the_call_order() -> None:
    doc = hookspecs.__doc__ or ""
    for hook in ("llmpress_score_importance", "llmpress_select_mask", "llmpress_update_weights"):
        assert hook in doc
    assert (
        doc.index("llmpress_score_importance")
        < doc.index("llmpress_select_mask")
        < doc.index("llmpress_update_weights")
    )
