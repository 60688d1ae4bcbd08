"""The plugin manager: built-in and third-party plugins found through one entry-point group.

Methods are dispatched by config type. ``llmpress_register_methods`` maps a config class to
the plugin that registered it; :meth:`Llmpress.hooks_for` returns that method's typed
hook callers, which call the owning plugin's hook implementations plus those of *general*
plugins (plugins that register no method, such as the built-in ``masking`` defaults). So a
method plugin never sees another method's config and needs no ``isinstance`` guard.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from llmpress import hookspecs
from llmpress.engine.stats import check_statistics
from llmpress.errors import RecipeError
from llmpress.format.formats import FORMATS
from llmpress.kernels.registry import Kernel, KernelTable
from llmpress.method_hooks import MethodHooks
from llmpress.recipe.config import MethodConfig

if TYPE_CHECKING:
    import torch

    from llmpress.format.formats import ModuleFormat

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "llmpress"
DISABLE_ENV = "LLMPRESS_DISABLE_PLUGINS"
#: extra plugin modules to import and register, comma-separated (like ``PYTEST_PLUGINS``)
PLUGINS_ENV = "LLMPRESS_PLUGINS"


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, config class and the plugin that registered it."""

    name: str
    config_cls: type[MethodConfig]
    plugin: str
    plugin_obj: Any = None


class Llmpress:
    """A pluggy manager plus the method registry built from ``llmpress_register_methods``."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.hook = pm.hook
        self.methods: dict[str, MethodInfo] = {}
        self._by_config: dict[type[MethodConfig], MethodInfo] = {}
        self._hooks: dict[str, MethodHooks] = {}
        self.kernels = KernelTable(known_formats=FORMATS)
        #: plugin name -> the names of the kernels it registered
        self.kernel_plugins: dict[str, list[str]] = {}
        self._collect_methods()
        self._collect_kernels()

    def _collect_methods(self) -> None:
        for impl in self.pm.hook.llmpress_register_methods.get_hookimpls():
            plugin_name = self.pm.get_name(impl.plugin) or repr(impl.plugin)

            def register(
                name: str | type[MethodConfig],
                config_cls: type[MethodConfig] | None = None,
                _p: str = plugin_name,
                _o: Any = impl.plugin,
            ) -> None:
                if config_cls is None and isinstance(name, type):  # register(ConfigClass)
                    config_cls = name
                    name = config_cls.method
                if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
                    raise TypeError(f"plugin {_p!r}: {name!r} must register a MethodConfig subclass")
                assert isinstance(name, str)
                if name in self.methods:
                    raise RecipeError(
                        f"method {name!r} registered twice: by {self.methods[name].plugin!r} and {_p!r}"
                    )
                if config_cls.method != name:
                    raise TypeError(
                        f"plugin {_p!r}: {config_cls.__name__}.method is {config_cls.method!r}, not {name!r}"
                    )
                check_statistics(config_cls.stats, name)
                info = MethodInfo(name, config_cls, _p, _o)
                self.methods[name] = info
                self._by_config[config_cls] = info

            impl.function(register=register)

    def _collect_kernels(self) -> None:
        for impl in self.pm.hook.llmpress_register_kernels.get_hookimpls():
            names = self.kernel_plugins.setdefault(impl.plugin_name, [])

            def register(kernel: Kernel, _names: list[str] = names, _p: str = impl.plugin_name) -> None:
                if not isinstance(kernel, Kernel):
                    raise TypeError(f"plugin {_p!r} must register Kernel objects, not {kernel!r}")
                self.kernels.add(kernel)
                _names.append(kernel.name)

            impl.function(register=register)

    def kernels_for(self, fmt: ModuleFormat, device: torch.device) -> list[Kernel]:
        """The registered kernels that can run a stored layer of ``fmt`` on ``device``
        (a :data:`llmpress.kernels.registry.KernelSource`)."""
        return self.kernels.candidates(fmt, device)

    def hooks_for(self, config: MethodConfig) -> MethodHooks:
        """The typed hook callers of ``config``'s method (found by its exact config class)."""
        info = self._by_config.get(type(config))
        if info is None:
            raise RecipeError(
                f"{type(config).__name__} is not a registered method config; known methods: "
                f"{', '.join(sorted(self.methods)) or '(none)'}"
            )
        hooks = self._hooks.get(info.name)
        if hooks is None:
            owners = {id(m.plugin_obj) for m in self.methods.values()}
            others = [
                p for p in self.pm.get_plugins() if id(p) in owners and p is not info.plugin_obj
            ]  # other methods' plugins
            hooks = self._hooks[info.name] = MethodHooks(self.pm, info.name, info.plugin, others)
        return hooks

    def method(self, name: str) -> MethodInfo:
        """Look a method up by name; a clear error lists the known ones."""
        try:
            return self.methods[name]
        except KeyError:
            known = ", ".join(sorted(self.methods)) or "(none)"
            raise RecipeError(
                f"unknown method {name!r}; known methods: {known}. Third-party methods come from "
                f"packages declaring an entry point in the 'llmpress' group (see `llmpress plugins`)"
            ) from None

    def plugins(self) -> dict[str, list[str]]:
        """Plugin name -> the methods it registers (plugins with none map to [])."""
        out: dict[str, list[str]] = {}
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            out[name] = sorted(m.name for m in self.methods.values() if m.plugin == name)
        return out

    def sections(self) -> dict[str, dict[str, list[str]]]:
        """Plugins by what they provide, each ``{plugin: [names]}``: ``stage_methods`` and
        ``allocation_searches`` (the methods it registers), ``kernels`` (the kernels it registers
        through ``llmpress_register_kernels``, by name) and ``general`` (a plugin with none of
        these: the hooks it implements, called for every method). A plugin may be in several."""
        from llmpress.recipe.allocation import AllocationConfig

        out: dict[str, dict[str, list[str]]] = {
            "stage_methods": {},
            "allocation_searches": {},
            "kernels": {},
            "general": {},
        }
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            for m in sorted(self.methods.values(), key=lambda m: m.name):
                if m.plugin == name:
                    search = issubclass(m.config_cls, AllocationConfig)
                    kind = "allocation_searches" if search else "stage_methods"
                    out[kind].setdefault(name, []).append(m.name)
            if name in self.kernel_plugins:
                out["kernels"][name] = sorted(self.kernel_plugins[name])
            if not any(name in section for section in out.values()):
                out["general"][name] = sorted(
                    c.name
                    for c in self.pm.get_hookcallers(plugin) or ()
                    if c.name not in ("llmpress_register_methods", "llmpress_register_kernels")
                )
        return out

    def register(self, plugin: ModuleType | Any, name: str | None = None) -> None:
        """Add a plugin (a module or an object with hook implementations) to this manager;
        its methods become usable in recipes at once."""
        self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self.methods.clear()
        self._by_config.clear()
        self._hooks.clear()
        self.kernels = KernelTable(known_formats=FORMATS)
        self.kernel_plugins.clear()
        self._collect_methods()
        self._collect_kernels()

    def plugin_origin(self, name: str) -> str:
        plugin = self.pm.get_plugin(name)
        for p, dist in self.pm.list_plugin_distinfo():
            if p is plugin:
                return f"{dist.project_name} {dist.version}"
        return getattr(plugin, "__name__", repr(plugin))


def make_plugin_manager(
    extra_plugins: list[ModuleType | Any] | None = None, load_entrypoints: bool = True
) -> Llmpress:
    """Build a fresh manager: specs, entry-point plugins, extra plugins, then ``check_pending``.

    Modules listed (comma-separated) in ``$LLMPRESS_PLUGINS`` are imported and registered;
    names listed in ``$LLMPRESS_DISABLE_PLUGINS`` are blocked.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in os.environ.get(DISABLE_ENV, "").split(","):
        if name.strip():
            pm.set_blocked(name.strip())
    if load_entrypoints:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for mod in os.environ.get(PLUGINS_ENV, "").split(","):
        if mod.strip() and pm.get_plugin(mod.strip()) is None and not pm.is_blocked(mod.strip()):
            try:
                pm.register(importlib.import_module(mod.strip()), name=mod.strip())
            except ImportError as e:
                raise RecipeError(
                    f"cannot import plugin module {mod.strip()!r} named in ${PLUGINS_ENV}: {e}"
                ) from e
    for p in extra_plugins or []:
        pm.register(p)
    pm.check_pending()
    return Llmpress(pm)


_default: Llmpress | None = None


def get_plugin_manager() -> Llmpress:
    """The process-wide manager, built on first use."""
    global _default
    if _default is None:
        _default = make_plugin_manager()
    return _default


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (after installing a plugin or changing the env)."""
    global _default
    _default = None
