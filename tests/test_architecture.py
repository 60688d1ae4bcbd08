"""Architecture rules of core/, checked on the source text (AST only: nothing is imported).

- no function or method longer than 80 lines (Triton kernels, decorated with ``triton.jit``, aside);
- no ``Any`` in the hook specs' signatures (core/hookspecs.py);
- no ``getattr``/``hasattr`` on a config, and no comparison of ``.method`` with a string literal:
  what the engine needs from a method is a typed capability of its config class. A config is known
  by its name (``config``, ``cfg``, ``alloc``, ``*_config``, ``st.config``); a transformers config
  (``model.config``, ``AutoConfig.from_pretrained``, a ``PretrainedConfig`` annotation) is exempt:
  its fields differ per architecture. Annotate such a parameter ``PretrainedConfig``;
- every subpackage of core/ opens with a docstring and holds at most 15 modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "core"
MAX_FUNCTION_LINES = 80
MAX_MODULES_PER_PACKAGE = 15
# Names that hold a method's config (or an allocation/stage config) in core/.
CONFIG_NAMES = frozenset({"config", "cfg", "alloc"})


def _sources(root: Path = CORE) -> Iterator[Path]:
    """Every Python file under ``root``, in a fixed order."""
    yield from sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(path: Path) -> str:
    """The path relative to the repository (as is, for a file outside it)."""
    return str(path.relative_to(CORE.parent)) if path.is_relative_to(CORE.parent) else str(path)


def _is_triton_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """True for ``@triton.jit`` (or ``@triton.jit(...)``, ``@jit``) functions."""
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        text = ast.unparse(target)
        if text in ("triton.jit", "jit"):
            return True
    return False


def long_functions(root: Path = CORE, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line name (N lines)`` for each function longer than ``limit`` lines (def to last line)."""
    offenders = []
    for path in _sources(root):
        for node in ast.walk(_parse(path)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _is_triton_kernel(node):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit:
                offenders.append(f"{_rel(path)}:{node.lineno} {node.name} ({length} lines)")
    return offenders


def _mentions_any(annotation: ast.expr | None) -> bool:
    """Whether an annotation (also a string annotation) names ``Any`` or ``typing.Any``."""
    if annotation is None:
        return False
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name) and node.id == "Any":
            return True
        if isinstance(node, ast.Attribute) and node.attr == "Any":
            return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                inner = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                continue
            if _mentions_any(inner):
                return True
    return False


def any_in_hookspecs(path: Path = CORE / "hookspecs.py") -> list[str]:
    """``file:line hook(param)`` for each parameter or return annotation of a hook spec naming ``Any``."""
    offenders = []
    for node in ast.walk(_parse(path)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
        for arg in params:
            if _mentions_any(arg.annotation):
                offenders.append(f"{_rel(path)}:{arg.lineno} {node.name}({arg.arg})")
        if _mentions_any(node.returns):
            offenders.append(f"{_rel(path)}:{node.lineno} {node.name} -> ...")
    return offenders


def _is_config(node: ast.expr) -> bool:
    """A config by its name: ``config``, ``cfg``, ``alloc``, a name ending in ``_config``, or an
    attribute ending in ``config`` (``st.config``, ``stage.config``, ``self.method_config``)."""
    if isinstance(node, ast.Name):
        return node.id in CONFIG_NAMES or node.id.endswith("_config")
    if isinstance(node, ast.Attribute):
        return node.attr.endswith("config")
    return False


# A transformers config (PretrainedConfig) is not a method's config: its fields differ per
# architecture, and probing them is how transformers' own code reads them. It is known by its name
# (``model_config``), its annotation (``PretrainedConfig``), or where it came from (``model.config``).
HF_CONFIG_NAMES = frozenset({"model_config", "hf_config", "text_config"})
HF_CONFIG_SOURCES = ("AutoConfig.from_pretrained", "load_config", "get_text_config", "import_module")


def _names_hf_config_class(annotation: str) -> bool:
    return "PretrainedConfig" in annotation or "PreTrainedConfig" in annotation


def _owner_is_model(node: ast.expr) -> bool:
    text = ast.unparse(node)
    return text in ("m", "module", "mod") or "model" in text


def _is_hf_source(value: ast.expr, known: set[str]) -> bool:
    """Whether ``value`` evaluates to a transformers config (or a module, for ``import_module``):
    ``model.config``, ``getattr(model, "config", None)``, ``AutoConfig.from_pretrained(...)``, a copy of
    one, one of several (``a or b``, ``a if c else b``, ``(a, b)`` to iterate over)."""
    if isinstance(value, ast.Name):
        return value.id in known
    if isinstance(value, ast.Attribute):
        return value.attr == "config" and _owner_is_model(value.value)
    if isinstance(value, ast.BoolOp):
        return any(_is_hf_source(v, known) for v in value.values)
    if isinstance(value, ast.IfExp):
        return _is_hf_source(value.body, known) or _is_hf_source(value.orelse, known)
    if isinstance(value, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_hf_source(v, known) for v in value.elts)
    if isinstance(value, ast.Call):
        func = ast.unparse(value.func)
        if func.endswith(HF_CONFIG_SOURCES) or f"{func}()" in known:
            return True
        if func in ("copy.deepcopy", "deepcopy", "copy.copy") and value.args:
            return _is_hf_source(value.args[0], known)
        return (
            func == "getattr"
            and len(value.args) >= 2
            and isinstance(value.args[1], ast.Constant)
            and value.args[1].value == "config"
            and _owner_is_model(value.args[0])
        )
    return False


def _is_hf_config(node: ast.expr, known: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in known or node.id in HF_CONFIG_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in HF_CONFIG_NAMES or (node.attr == "config" and _owner_is_model(node.value))
    return False


def _walk_scope(scope: ast.AST) -> Iterator[ast.AST]:
    """The nodes of ``scope`` itself, not those of the functions and classes defined in it."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(node))


def _hf_names(scope: ast.AST, inherited: set[str]) -> set[str]:
    """Names bound in ``scope`` (by its parameters, assignments and imports) to transformers configs,
    or to modules: names of configs that are not a method's."""
    known = set(inherited)
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = scope.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
            ann = ast.unparse(arg.annotation) if arg.annotation else ""
            if _names_hf_config_class(ann):
                known.add(arg.arg)
            else:  # a parameter shadows the outer name
                known.discard(arg.arg)
    for _ in range(2):  # twice: an alias may be assigned before its source in the text
        for node in _walk_scope(scope):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # -> PretrainedConfig
                if node.returns is not None and _names_hf_config_class(ast.unparse(node.returns)):
                    known.add(f"{node.name}()")
            elif isinstance(node, ast.Assign) and _is_hf_source(node.value, known):
                known.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if _names_hf_config_class(ast.unparse(node.annotation)) or (
                    node.value is not None and _is_hf_source(node.value, known)
                ):
                    known.add(node.target.id)
            elif isinstance(node, ast.NamedExpr) and _is_hf_source(node.value, known):
                known.add(node.target.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):  # a module named ``config``
                known.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif (
                isinstance(node, ast.For)
                and isinstance(node.target, ast.Name)
                and _is_hf_source(node.iter, known)  # for cfg in (model.config, ...)
            ):
                known.add(node.target.id)
    return known


def _is_str(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_is_str(e) for e in node.elts)
    return False


class _ProbeFinder(ast.NodeVisitor):
    """Collects config probes, tracking which names are transformers configs in each scope."""

    def __init__(self, path: Path, module: ast.Module) -> None:
        self.path = path
        self.known = [_hf_names(module, set())]
        self.found: list[str] = []

    def _scope(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.known.append(_hf_names(node, self.known[-1]))
        self.generic_visit(node)
        self.known.pop()

    visit_FunctionDef = _scope
    visit_AsyncFunctionDef = _scope

    def visit_Call(self, node: ast.Call) -> None:
        if (
            isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and node.args
            and _is_config(node.args[0])
            and not _is_hf_config(node.args[0], self.known[-1])
        ):
            self.found.append(f"{_rel(self.path)}:{node.lineno} {ast.unparse(node)}")
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        sides = [node.left, *node.comparators]
        by_method = any(isinstance(s, ast.Attribute) and s.attr == "method" for s in sides)
        if by_method and any(_is_str(s) for s in sides):
            self.found.append(f"{_rel(self.path)}:{node.lineno} {ast.unparse(node)}")
        self.generic_visit(node)


def config_probes(root: Path = CORE) -> list[str]:
    """``file:line code`` for each ``getattr``/``hasattr`` on a method's config and each ``.method``
    compared with a string literal."""
    offenders: list[str] = []
    for path in _sources(root):
        module = _parse(path)
        finder = _ProbeFinder(path, module)
        finder.visit(module)
        offenders += finder.found
    return offenders


def subpackages(root: Path = CORE) -> list[Path]:
    """Every folder under ``root`` that holds Python modules."""
    return sorted(
        {p.parent for p in _sources(root) if p.parent != root and "__pycache__" not in p.parent.parts}
    )


# --- the rules ---------------------------------------------------------------------------------


def test_no_long_functions() -> None:
    offenders = long_functions()
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def test_no_any_in_hookspecs() -> None:
    offenders = any_in_hookspecs()
    assert not offenders, "Any in hook specs:\n" + "\n".join(offenders)


def test_no_config_probes_or_method_name_branches() -> None:
    offenders = config_probes()
    assert not offenders, "getattr/hasattr on a config or .method == '...':\n" + "\n".join(offenders)


@pytest.mark.parametrize("package", subpackages(), ids=lambda p: _rel(p))
def test_subpackage_has_docstring_and_few_modules(package: Path) -> None:
    init = package / "__init__.py"
    assert init.is_file(), f"{_rel(package)} has no __init__.py"
    assert ast.get_docstring(_parse(init)), f"{_rel(init)} has no docstring"
    modules = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    modules += [d.name for d in package.iterdir() if (d / "__init__.py").is_file()]
    assert len(modules) <= MAX_MODULES_PER_PACKAGE, f"{_rel(package)}: {len(modules)} modules"


# --- the checkers catch what they should (so the rules above cannot pass vacuously) ----------


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "m.py").write_text(text, encoding="utf-8")
    return tmp_path


def test_checker_finds_a_long_function_but_not_a_triton_kernel(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    root = _write(tmp_path, f"def f():\n{body}\n\n@triton.jit\ndef k():\n{body}\n\ndef g():\n    pass\n")
    found = long_functions(root)
    assert len(found) == 1 and found[0].endswith(f"f ({MAX_FUNCTION_LINES + 1} lines)")


def test_checker_finds_any_in_a_hookspec(tmp_path: Path) -> None:
    path = _write(tmp_path, "def h(a: int, b: 'list[Any]') -> typing.Any: ...\ndef ok(a: int) -> int: ...\n")
    assert len(any_in_hookspecs(path / "m.py")) == 2


def test_checker_finds_config_probes(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        "getattr(config, 'levels', None)\nhasattr(cfg, 'x')\ngetattr(st.config, 'y')\n"
        "getattr(alloc, 'z')\nif stage.method == 'explicit': pass\nif x.method in ('a', 'b'): pass\n"
        "getattr(model.config, 'hidden_size')\ngetattr(module, 'weight')\nif x.name == 'a': pass\n"
        "def f(config: PretrainedConfig, model):\n    cfg = getattr(model, 'config', None)\n"
        "    getattr(config, 'head_dim', None)\n    getattr(cfg, 'vocab_size', 0)\n"
        "def g(config):\n    getattr(config, 'levels', None)\n"
        "def h(model, stage):\n    cfg = plan_for(model.config, stage)\n    getattr(cfg, 'ratio', 0.0)\n"
        "def smaller(model) -> PretrainedConfig: ...\n"
        "def k(model):\n    config = smaller(model)\n    hasattr(config, 'head_dim')\n",
    )
    found = config_probes(root)
    assert len(found) == 8 and found[-2].endswith("getattr(config, 'levels', None)")
    assert found[-1].endswith("getattr(cfg, 'ratio', 0.0)")
