"""Recipes: an ordered list of stages, from YAML/JSON files, dicts or Python dataclasses.

```yaml
stages:
  - method: wanda          # a registered method name
    sparsity: 0.5          # every other key is an option of the method's config
    pattern: "2:4"
    targets: ["mlp"]       # optional regexes over module names (default: all block linears)
    ignore: ["down_proj"]  # optional regexes removed from the targets
    allocation:            # optional: per-layer levels under the stage's budget (llmpress.allocation.problem)
      method: evopress     # or uniform, owl (sparsity); shortgpt, sleb (method: drop_blocks)
```
"""

from __future__ import annotations

import dataclasses
import json
import re
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from llmpress.errors import RecipeError
from llmpress.plugin_manager import Llmpress, get_plugin_manager

if TYPE_CHECKING:
    from llmpress.method_hooks import MethodHooks
from llmpress.recipe.allocation import AllocationConfig, resolve_allocation, split_average
from llmpress.recipe.config import MethodConfig, QuantConfig

#: the most stages a recipe may have (a real recipe has a handful; each is a pass over the model)
MAX_STAGES = 64
#: the largest recipe file read, by format: YAML parses in pure Python (about 5 s per MiB);
#: JSON parses fast and is what llmpress writes (an explicit allocation's per-layer levels)
MAX_RECIPE_BYTES = {"yaml": 1 << 20, "json": 16 << 20}
#: the most values a YAML recipe may expand to through its anchors and aliases (``*name``):
#: a file within the size limit has fewer without aliases; nested aliases can reach billions
MAX_RECIPE_NODES = 1_000_000


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers (``pattern: 2:4`` stays the string "2:4") and without
    duplicate keys (YAML would keep the last one silently)."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first is not None:
                where = f"line {line}" if first == line else f"lines {first} and {line}"
                raise RecipeError(
                    f"duplicate key {key!r} on {where}; YAML would silently keep only the last one: "
                    f"remove one of them"
                )
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a YAML document whose aliases expand it past :data:`MAX_RECIPE_NODES` values
    ("billion laughs") or make it contain itself. Each node is sized once (memoized)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        if children_done:
            open_.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_RECIPE_NODES:
                raise RecipeError(
                    f"the recipe expands to more than {MAX_RECIPE_NODES:,} values through its YAML aliases "
                    f"(*name); write the values out, or use fewer nested aliases"
                )
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_:
            raise RecipeError(
                f"the recipe contains itself through a YAML alias (line {node.start_mark.line + 1}); "
                f"a recipe is a tree"
            )
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


_RecipeLoader.yaml_implicit_resolvers = {
    first: [
        (tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


@dataclasses.dataclass
class Stage:
    """One compression step: a method, its options and the layers it applies to."""

    method: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    targets: list[str] | None = None
    ignore: list[str] = dataclasses.field(default_factory=list)
    #: the stage's ``allocation:`` section (``{method: evopress, ...}``), or ``None``
    allocation: dict[str, Any] | None = None

    @classmethod
    def from_config(
        cls, config: MethodConfig, targets: list[str] | None = None, ignore: Sequence[str] = ()
    ) -> Stage:
        d = config.to_dict()
        d.pop("version")
        return cls(method=d.pop("method"), options=d, targets=targets, ignore=list(ignore))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, **self.options}
        if self.targets is not None:
            out["targets"] = list(self.targets)
        if self.ignore:
            out["ignore"] = list(self.ignore)
        if self.allocation is not None:
            out["allocation"] = dict(self.allocation)
        return out


@dataclasses.dataclass
class ResolvedStage:
    """A stage with its validated method config."""

    index: int
    stage: Stage
    config: MethodConfig
    #: the validated ``allocation:`` config
    allocation: AllocationConfig | None = None
    #: the method's typed hooks, and the allocation search's (set by :meth:`Recipe.resolve`)
    hooks: MethodHooks | None = None
    search: MethodHooks | None = None

    @property
    def name(self) -> str:
        return f"stage {self.index} ({self.stage.method})"


@dataclasses.dataclass
class Recipe:
    """An ordered list of :class:`Stage` (or :class:`MethodConfig`, taken as a stage)."""

    stages: list[Stage | MethodConfig]
    #: ``"fp8"``: calibrate per-layer key/value scales and keep the KV cache in FP8 (E4M3);
    #: ``"int8"``/``"int4"``: round keys and values per token and head group (dynamic, symmetric)
    kv_cache: str | None = None
    #: integer KV cache: channels of a head sharing one scale (``None``: the head dimension)
    kv_group_size: int | None = None
    #: mixture-of-experts: an expert with fewer routed calibration tokens than this gets its
    #: statistics from all of its block's tokens (``None``: the default, see llmpress.engine.moe_stats)
    moe_min_tokens: int | None = None

    def normalized(self) -> list[Stage]:
        return [s if isinstance(s, Stage) else Stage.from_config(s) for s in self.stages]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stages": [s.to_dict() for s in self.normalized()]}
        if self.kv_cache is not None:
            out["kv_cache"] = (
                self.kv_cache
                if self.kv_group_size is None
                else {"type": self.kv_cache, "group_size": self.kv_group_size}
            )
        if self.moe_min_tokens is not None:
            out["moe_min_tokens"] = self.moe_min_tokens
        return out

    def resolve(self, pm: Llmpress | None = None) -> list[ResolvedStage]:
        """Validate every stage (method known, options valid) and build its config."""
        pm = pm or get_plugin_manager()
        stages = self.normalized()
        if not stages:
            raise RecipeError("the recipe has no stages; add e.g. {method: wanda, sparsity: 0.5}")
        _check_stage_count(len(stages))
        out = []

        for i, st in enumerate(stages):
            info = pm.method(st.method)
            if (
                st.allocation is not None
                and set(st.allocation) == {"method"}
                and st.allocation["method"] in info.config_cls.own_allocations
            ):  # the method's own allocation option (structured: uniform | global), not a search
                st = dataclasses.replace(
                    st, options={**st.options, "allocation": st.allocation["method"]}, allocation=None
                )
            own = info.config_cls.own_allocations
            if own and st.allocation is not None and str(st.allocation.get("method")) not in pm.methods:
                raise RecipeError(
                    f"stage {i} ({st.method}): allocation must be one of {list(own)} or a search such as "
                    f"{{method: evopress}}, got {st.allocation.get('method')!r}"
                )
            try:
                options, average = (st.options, None)
                if issubclass(info.config_cls, QuantConfig):  # bits: 2.5 is a budget under an allocation
                    options, average = split_average(st.options, st.allocation)
                cfg = info.config_cls.from_dict(options)
            except RecipeError as e:
                raise RecipeError(f"stage {i} ({st.method}): {e}") from None
            alloc = resolve_allocation(pm, i, st.allocation, cfg, average)
            search = None if alloc is None else pm.hooks_for(alloc)
            out.append(ResolvedStage(i, st, cfg, alloc, pm.hooks_for(cfg), search))
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """From ``{"stages": [...]}``, a list of stage dicts, or one stage dict."""
        kv_cache = None
        moe_min_tokens = None
        if isinstance(data, dict) and "stages" in data:
            extra = set(data) - {"stages", "kv_cache", "moe_min_tokens"}
            if extra:
                raise RecipeError(
                    f"unknown top-level recipe keys {sorted(extra)}; a recipe has 'stages' and optionally "
                    f"'kv_cache' and 'moe_min_tokens'"
                )
            kv_cache = data.get("kv_cache")
            moe_min_tokens = data.get("moe_min_tokens")
            if moe_min_tokens is not None and (
                isinstance(moe_min_tokens, bool) or not isinstance(moe_min_tokens, int) or moe_min_tokens < 0
            ):
                raise RecipeError(
                    f"moe_min_tokens must be an integer >= 0 (routed tokens below which an expert's statistics "
                    f"come from all tokens; 0 turns the fallback off), got {moe_min_tokens!r}"
                )
            data = data["stages"]
        elif isinstance(data, dict) and "method" in data:
            data = [data]
        if not isinstance(data, list):
            raise RecipeError("a recipe is a mapping with a 'stages' list (see the README)")
        _check_stage_count(len(data))
        stages: list[Stage | MethodConfig] = []
        for i, d in enumerate(data):
            if not isinstance(d, dict) or "method" not in d:
                raise RecipeError(f"stage {i} must be a mapping with a 'method' key, got {d!r}")
            d = dict(d)
            if "kv_cache" in d:  # a stage may ask for it too: it applies to the whole model
                kv_cache = kv_cache or d.pop("kv_cache")
                d.pop("kv_cache", None)
            method = d.pop("method")
            targets = d.pop("targets", None)
            ignore = d.pop("ignore", [])
            allocation = d.pop("allocation", None)
            if isinstance(allocation, str):
                allocation = {"method": allocation}
            if allocation is not None and (not isinstance(allocation, dict) or "method" not in allocation):
                raise RecipeError(
                    f"stage {i}: 'allocation' must be a mapping with a 'method' key, got {allocation!r}"
                )
            if isinstance(targets, str):
                targets = [targets]
            if isinstance(ignore, str):
                ignore = [ignore]
            for key, regexes in (("targets", targets), ("ignore", ignore)):
                if regexes is not None and not (
                    isinstance(regexes, list) and all(isinstance(r, str) for r in regexes)
                ):
                    raise RecipeError(
                        f"stage {i}: {key!r} must be a module-name regex or a list of them, got "
                        f"{reprlib.repr(regexes)}"
                    )
            opts = d.pop("options", {}) or {}
            stages.append(
                Stage(
                    method=str(method),
                    options={**d, **opts},
                    targets=targets,
                    ignore=list(ignore),
                    allocation=allocation,
                )
            )
        kv_type, kv_group = parse_kv_cache(kv_cache)
        return cls(stages=stages, kv_cache=kv_type, kv_group_size=kv_group, moe_min_tokens=moe_min_tokens)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a ``.yaml``/``.yml``/``.json`` recipe file."""
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file {p} does not exist")
        fmt = "json" if p.suffix.lower() == ".json" else "yaml"
        size, limit = p.stat().st_size, MAX_RECIPE_BYTES[fmt]
        if size > limit:
            raise RecipeError(
                f"recipe file {p} is {size / 2**20:.1f} MiB; a {fmt.upper()} recipe may be at most "
                f"{limit // 2**20} MiB (at most {MAX_STAGES} stages). Is this the right file?"
            )
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RecipeError(
                f"recipe file {p} is not text (a binary file?); a recipe is a YAML or JSON file"
            ) from None
        if "\x00" in text:
            raise RecipeError(
                f"recipe file {p} holds NUL bytes (a binary file?); a recipe is a YAML or JSON file"
            )
        try:
            if fmt == "json":
                data = json.loads(text, object_pairs_hook=_unique_keys)
            else:
                data = yaml.load(text, Loader=_RecipeLoader)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise RecipeError(f"recipe file {p} is not valid {fmt.upper()}: {e}") from e
        except RecursionError:
            raise RecipeError(f"recipe file {p} is nested too deeply to be a recipe") from None
        except RecipeError as e:
            raise RecipeError(f"{p}: {e}") from None
        try:
            return cls.from_dict(data)
        except RecipeError as e:
            raise RecipeError(f"{p}: {e}") from None

    def dump(self, path: str | Path) -> None:
        p = Path(path)
        d = self.to_dict()
        p.write_text(json.dumps(d, indent=2) if p.suffix == ".json" else yaml.safe_dump(d, sort_keys=False))


KV_CACHE_TYPES = ("fp8", "int8", "int4")


def parse_kv_cache(value: Any) -> tuple[str | None, int | None]:
    """``kv_cache:`` of a recipe -> ``(type, group_size)``: ``fp8``, ``int8``, ``int4`` or
    ``{type: int4, group_size: 64}`` (integer caches only; default: the head dimension)."""
    if value is None:
        return None, None
    kv_type, group = value, None
    if isinstance(value, dict):
        extra = set(value) - {"type", "group_size"}
        if extra or "type" not in value:
            raise RecipeError(
                f"kv_cache as a mapping takes 'type' and optionally 'group_size' (e.g. {{type: int4, "
                f"group_size: 64}}), got {value!r}"
            )
        kv_type, group = value["type"], value.get("group_size")
    if kv_type not in KV_CACHE_TYPES:
        raise RecipeError(
            f"kv_cache must be 'fp8' (FP8 E4M3 with calibrated scales), 'int8' or 'int4' (per token and head "
            f"group, dynamic), got {kv_type!r}"
        )
    if group is not None:
        if kv_type == "fp8":
            raise RecipeError("kv_cache: fp8 has one scale per layer and takes no group_size; drop it")
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise RecipeError(
                f"kv_cache group_size must be a positive integer dividing the head dimension (e.g. 64), got "
                f"{group!r}"
            )
    return str(kv_type), group


def _check_stage_count(n: int) -> None:
    if n > MAX_STAGES:
        raise RecipeError(
            f"the recipe has {n} stages; at most {MAX_STAGES} are allowed (each stage is a pass over the "
            f"model); a real recipe has a handful: is this the right recipe?"
        )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s object hook: a key given twice is an error (JSON keeps the last one)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            where = f" in the stage of method {out['method']!r}" if isinstance(out.get("method"), str) else ""
            raise RecipeError(
                f"duplicate key {key!r}{where}; JSON would silently keep only the last one: remove one of them"
            )
        out[key] = value
    return out


def as_recipe(recipe: Recipe | dict[str, Any] | list[Any] | str | Path | MethodConfig) -> Recipe:
    """Accept a Recipe, a dict/list, a file path or a single method config."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, MethodConfig):
        return Recipe(stages=[recipe])
    if isinstance(recipe, (str, Path)):
        return Recipe.load(recipe)
    if isinstance(recipe, list) and recipe and all(isinstance(s, (Stage, MethodConfig)) for s in recipe):
        return Recipe(stages=list(recipe))
    return Recipe.from_dict(recipe)
