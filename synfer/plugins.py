"""Plugin discovery through the `synfer` entry-point group (pluggy).

Entry points load one at a time: a plugin that fails to import becomes a warning
naming it (SYNFER_STRICT_PLUGINS=1 turns that into an error). SYNFER_DISABLE_PLUGIN_AUTOLOAD=1
skips entry points entirely (tests register what they need by hand).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from importlib import metadata

import pluggy

from synfer import hookspecs
from synfer.stages import STAGE_KINDS, Stage

GROUP = "synfer"


class PluginError(Exception):
    pass


@dataclass(frozen=True)
class PluginInfo:
    name: str
    kind: str
    cls: type
    provider: str  # distribution (or module) that registered it
    version: str


class Registry:
    def __init__(self):
        self.pm = pluggy.PluginManager("synfer")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[tuple[str, str], PluginInfo] = {}
        self.failures: list[tuple[str, str]] = []

    # -------------------------------------------------------------- loading
    def load_entrypoints(self, strict: bool | None = None) -> None:
        if strict is None:
            strict = os.environ.get("SYNFER_STRICT_PLUGINS", "") not in ("", "0")
        for ep in metadata.entry_points(group=GROUP):
            dist = getattr(ep, "dist", None)
            provider = dist.name if dist else ep.module
            version = dist.version if dist else "?"
            try:
                module = ep.load()
                self.add(module, provider=provider, version=version)
            except Exception as exc:  # one broken plugin must not stop the CLI
                msg = f"synfer plugin {ep.name!r} ({ep.value}, from {provider}) failed to load: {type(exc).__name__}: {exc}"
                if strict:
                    raise PluginError(msg) from exc
                self.failures.append((ep.name, msg))
                warnings.warn(msg, stacklevel=2)

    def add(self, module, provider: str | None = None, version: str = "?") -> None:
        """Register a module (or object) with hookimpls and collect the stages it hands over."""
        provider = provider or getattr(module, "__name__", repr(module))
        if self.pm.is_registered(module):
            return
        self.pm.register(module)
        self.pm.check_pending()  # a misspelled hook name is an error, not silence
        impl = getattr(module, "register_stages", None)
        if impl is None:
            return
        found: list[type] = []
        impl(register=found.append)
        for cls in found:
            self._add_stage(cls, provider, version)

    def _add_stage(self, cls: type, provider: str, version: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Stage)) or getattr(cls, "kind", None) not in STAGE_KINDS:
            raise PluginError(f"{provider} registered {cls!r}, which is not a subclass of a synfer stage ({', '.join(STAGE_KINDS)})")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"{provider} registered {cls.__name__} without a `name`")
        key = (cls.kind, name)
        if key in self.plugins and self.plugins[key].cls is not cls:
            other = self.plugins[key]
            raise PluginError(f"two {cls.kind} plugins are named {name!r}: {other.cls.__module__}.{other.cls.__name__} "
                              f"(from {other.provider}) and {cls.__module__}.{cls.__name__} (from {provider}); uninstall or rename one")
        self.plugins[key] = PluginInfo(name, cls.kind, cls, provider, version)

    # -------------------------------------------------------------- lookup
    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self.plugins if k == kind)

    def get(self, kind: str, name: str) -> type[Stage]:
        if kind not in STAGE_KINDS:
            raise PluginError(f"no stage kind {kind!r}; kinds: {', '.join(STAGE_KINDS)}")
        if (kind, name) in self.plugins:
            return self.plugins[(kind, name)].cls
        installed = ", ".join(self.names(kind)) or "none"
        raise PluginError(f"no {kind} named {name!r}. Installed: {installed}. Run 'synfer plugins' to list them.")

    def build(self, kind: str, block: dict):
        """Instantiate a stage from a recipe block {plugin: name, ...config}."""
        block = dict(block)
        cls = self.get(kind, block.pop("plugin"))
        return cls(cls.Config(**block))


_REGISTRY: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    global _REGISTRY
    if _REGISTRY is None or reload:
        reg = Registry()
        if os.environ.get("SYNFER_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0"):
            reg.load_entrypoints()
        _REGISTRY = reg
    return _REGISTRY
