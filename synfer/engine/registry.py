"""Plugin discovery through the `synfer` entry-point group (pluggy).

Each plugin module is checked whole before anything of it is registered: its hook names,
its label spaces and every stage it hands over (synfer.contract.contracts.class_problems). A plugin
that fails to import or to pass these checks is left out with one warning naming it, and
costs only itself (SYNFER_STRICT_PLUGINS=1 turns the warning into an error).

Names are resolved when a recipe uses them. Two providers of one name (a third party's
`tiny-cnn` beside the built-in one, or an expert named like a guidance classifier, since
both can vote) is an error naming both, unless the recipe names the provider:
`plugin: synfer:tiny-cnn` or `plugin: acme:tiny-cnn` (distribution or entry-point name).

Selection, as pytest and llm have it (names are entry-point or distribution names):
  SYNFER_PLUGINS=a,b            load only these third-party plugins (the built-ins always load)
  SYNFER_DISABLE_PLUGINS=a,b    never load these (`synfer -p no:a` does the same; `synfer` = all built-ins)
  SYNFER_DISABLE_PLUGIN_AUTOLOAD=1  load no entry point at all (tests register by hand)
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy
from pydantic import ValidationError

from synfer.contract import hookspecs
from synfer.contract import labels as L
from synfer.contract.contracts import PluginCallError, PluginContractError, PluginError, calling, class_problems
from synfer.contract.isolation import escaped, plugin_code, watch_interrupts
from synfer.contract.stages import STAGE_KINDS, Stage, StageConfig

GROUP = "synfer"
BUILTIN = "synfer"  # the distribution that ships the built-in plugins
# Recipe slots that take more than one kind: any guidance classifier may vote as an expert.
SLOT_KINDS = {kind: (kind, *cls.stands_in) for kind, cls in STAGE_KINDS.items() if cls.stands_in}  # who may fill a block
HOOKS = hookspecs.HOOKS

__all__ = ["PluginError", "PluginCallError", "PluginContractError", "PluginInfo", "Registry", "get_registry"]


def _warn(msg: str, where: str) -> None:
    """A plugin left out (or its commands): warned once per plugin; the CLI prints `warning: ...` (synfer/logs.py).
    One location per plugin: the default filter then shows each plugin's warning, not only the first."""
    warnings.warn_explicit(msg, UserWarning, filename=f"synfer-plugin:{where}", lineno=0, module="synfer.engine.registry")



def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def env_names(var: str) -> set[str]:
    return {_norm(n) for n in os.environ.get(var, "").split(",") if n.strip()}


@dataclass(frozen=True)
class PluginInfo:
    name: str
    kind: str
    cls: type
    provider: str  # distribution (or module) that registered it
    version: str
    entry_point: str = ""

    @property
    def builtin(self) -> bool:
        return self.provider == BUILTIN

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name!r} (from {self.provider}{', built-in' if self.builtin else ''})"

    def matches(self, prefix: str) -> bool:
        return _norm(prefix) in (_norm(self.provider), _norm(self.entry_point))


def slow_import_s() -> float:
    """Seconds after which a plugin's import is named in a warning (SYNFER_SLOW_IMPORT_S, default 3)."""
    try:
        return float(os.environ.get("SYNFER_SLOW_IMPORT_S", "") or 3.0)
    except ValueError:
        return 3.0


class Registry:
    def __init__(self):
        watch_interrupts()  # a real Ctrl-C inside plugin code stops synfer; a plugin's own KeyboardInterrupt is its error
        self.pm = pluggy.PluginManager("synfer")
        self.pm.add_hookspecs(hookspecs)
        self.entries: list[PluginInfo] = []
        self.failures: list[tuple[str, str]] = []  # (entry point, message)
        self.skipped: list[tuple[str, str]] = []  # (entry point, why): SYNFER_PLUGINS / SYNFER_DISABLE_PLUGINS
        self.failed_names: dict[str, str] = {}  # stage name -> why its plugin was left out
        self.spaces: dict[str, str] = {}  # plugin-declared label space -> provider
        self._provider: dict[int, str] = {}  # id(registered module) -> provider, for messages

    @property
    def plugins(self) -> dict[tuple[str, str], PluginInfo]:
        """(kind, name) -> the plugin of that name (the built-in one where several share it)."""
        out: dict[tuple[str, str], PluginInfo] = {}
        for p in sorted(self.entries, key=lambda p: not p.builtin):
            out.setdefault((p.kind, p.name), p)
        return out

    # -------------------------------------------------------------- loading
    def load_entrypoints(self, strict: bool | None = None) -> None:
        if strict is None:
            strict = os.environ.get("SYNFER_STRICT_PLUGINS", "") not in ("", "0")
        selected, disabled = env_names("SYNFER_PLUGINS"), env_names("SYNFER_DISABLE_PLUGINS")
        loaded = []
        for ep in metadata.entry_points(group=GROUP):
            dist = getattr(ep, "dist", None)
            provider = dist.name if dist else ep.module
            version = dist.version if dist else "?"
            names = {_norm(ep.name), _norm(provider)}
            if names & disabled or (selected and provider != BUILTIN and not names & selected):
                self.skipped.append((ep.name, "disabled" if names & disabled else "not in SYNFER_PLUGINS"))
                continue
            t = time.perf_counter()
            try:
                with plugin_code():  # its prints go to stderr: `synfer plugins --json` stays JSON
                    loaded.append((ep, ep.load(), provider, version))
            except BaseException as exc:  # one broken plugin must not stop the CLI, nor exit it (a real Ctrl-C does)
                if (why := escaped(exc)) is None:
                    raise
                self._fail(ep, provider, f"failed to import: {why}", exc, strict)
            if (took := time.perf_counter() - t) > slow_import_s():
                _warn(f"synfer plugin {ep.name!r} ({ep.value}, from {provider}) took {took:.1f} s to import, which every synfer "
                      "command waits for (--help too); import heavy modules (torch, ...) inside the functions that use them",
                      f"{ep.name}:slow")
        # plugins that declare label spaces go first, so another plugin's stages may use them
        loaded.sort(key=lambda t: not hasattr(t[1], "register_label_spaces"))
        for ep, module, provider, version in loaded:
            try:
                self.add(module, provider=provider, version=version, entry_point=ep.name)
            except BaseException as exc:  # the hooks run inside `calling`: sys.exit() there is a PluginCallError already
                if escaped(exc) is None:
                    raise
                self._fail(ep, provider, f"was left out: {exc if isinstance(exc, PluginError) else escaped(exc)}", exc, strict)

    def _fail(self, ep, provider: str, what: str, exc: BaseException, strict: bool) -> None:
        msg = f"synfer plugin {ep.name!r} ({ep.value}, from {provider}) {what}"
        if strict:
            raise PluginError(msg) from exc
        self.failures.append((ep.name, msg))
        _warn(msg, ep.name)

    def add(self, module, provider: str | None = None, version: str = "?", entry_point: str = "") -> None:
        """Check a module (or object) with hookimpls whole, then register it and the stages it hands over.
        Nothing of it is registered when any check fails (PluginError)."""
        provider = provider or getattr(module, "__name__", repr(module))
        if self.pm.is_registered(module):
            return
        typos = [a for a in dir(module) if self.pm.parse_hookimpl_opts(module, a) is not None and a not in HOOKS]
        if typos:
            raise PluginError(f"{provider} implements unknown hook(s) {', '.join(typos)}; synfer's hooks are {', '.join(HOOKS)}")
        unmarked = [h for h in HOOKS if callable(getattr(module, h, None)) and not self._is_hook(module, h)]
        if unmarked:
            raise PluginError(f"{provider} defines {', '.join(unmarked)} without the @synfer.hookimpl marker; add it, or nothing is called")
        if not any(self._is_hook(module, h) for h in HOOKS):
            raise PluginError(f"{provider} implements none of synfer's hooks ({', '.join(HOOKS)}); is the entry point the right module?")
        spaces: dict[str, tuple[str, ...]] = {}
        found: list[type] = []
        with calling(f"plugin {provider}", "register_label_spaces"):
            if self._is_hook(module, "register_label_spaces"):
                module.register_label_spaces(register=lambda name, classes: spaces.__setitem__(name, tuple(classes)))
        with calling(f"plugin {provider}", "register_stages"):
            if self._is_hook(module, "register_stages"):
                module.register_stages(register=found.append)
        problems = self._space_problems(spaces, provider)
        known = set(L.LABEL_SPACES) | set(spaces)
        for cls in found:
            problems += class_problems(cls, provider, known)
            problems += self._clash_within(cls, provider, found)
        if problems:
            for cls in found:
                self.failed_names[str(getattr(cls, "name", ""))] = f"{provider}: {problems[0]}"
            raise PluginContractError("; ".join(dict.fromkeys(problems)))
        self.pm.register(module)
        self._provider[id(module)] = provider
        for name, classes in spaces.items():
            L.register_label_space(name, classes)
            self.spaces[name] = provider
        for cls in found:
            info = PluginInfo(cls.name, cls.kind, cls, provider, version, entry_point)
            if info not in self.entries:
                self.entries.append(info)

    def _is_hook(self, module, name: str) -> bool:
        # hasattr first: pluggy 1.6 (the GPU machine's) reads the attribute without a default, an AttributeError on a module lacking it
        return hasattr(module, name) and self.pm.parse_hookimpl_opts(module, name) is not None

    def _space_problems(self, spaces: dict, provider: str) -> list[str]:
        out = []
        for name, classes in spaces.items():
            try:
                canon = tuple(L.canonical(c) for c in classes)
            except (ValueError, AttributeError) as exc:
                out.append(f"{provider} declares label space {name!r} with {classes!r}: {exc}")
                continue
            if not isinstance(name, str) or not name or ":" in name or len(set(canon)) != len(canon) or not canon:
                out.append(f"{provider} declares label space {name!r} with {classes!r}; expected a name without ':' and distinct expressions")
            elif name in L.LABEL_SPACES and L.LABEL_SPACES[name] != canon:
                out.append(f"{provider} declares label space {name!r} as ({', '.join(canon)}), but {self.spaces.get(name, BUILTIN)} "
                           f"already defines it as ({', '.join(L.LABEL_SPACES[name])}); pick another name")
        return out

    def _clash_within(self, cls, provider: str, found: list[type]) -> list[str]:
        """One provider cannot register two classes under one (kind, name)."""
        same = [c for c in found if c is not cls and getattr(c, "kind", None) == getattr(cls, "kind", None)
                and getattr(c, "name", None) == getattr(cls, "name", None)]
        same += [p.cls for p in self.entries if p.provider == provider and p.kind == getattr(cls, "kind", None)
                 and p.name == getattr(cls, "name", None) and p.cls is not cls]
        if not same:
            return []
        other = same[0]
        return [f"two {cls.kind} plugins are named {cls.name!r}: {other.__module__}.{other.__name__} and "
                f"{cls.__module__}.{cls.__name__}, both from {provider}; rename one"]

    # -------------------------------------------------------------- lookup
    def names(self, kind: str) -> list[str]:
        return sorted({p.name for p in self.entries if p.kind == kind})

    def resolve(self, kind: str, name: str) -> PluginInfo:
        """The plugin a recipe means by `name` (or `provider:name`) in a `kind` slot; clear errors otherwise."""
        if kind not in STAGE_KINDS:
            raise PluginError(f"no stage kind {kind!r}; kinds: {', '.join(STAGE_KINDS)}")
        kinds = SLOT_KINDS.get(kind, (kind,))
        prefix, _, bare = str(name).rpartition(":")
        found = [p for p in self.entries if p.kind in kinds and p.name == bare and (not prefix or p.matches(prefix))]
        if not found:
            installed = ", ".join(sorted({n for k in kinds for n in self.names(k)})) or "none"
            why = f" Its plugin was left out: {self.failed_names[bare]}." if bare in self.failed_names else ""
            raise PluginError(f"no {kind} named {name!r}.{why} Installed: {installed}. Run 'synfer plugins' to list them.")
        if len({p.provider for p in found}) > 1:
            found.sort(key=lambda p: not p.builtin)
            labels = [p.label for p in found]
            both = ", ".join(labels[:-1]) + " and " + labels[-1]
            fixes = " or ".join(f"`plugin: {p.provider}:{bare}`" for p in found)
            raise PluginError(f"{len(found)} plugins answer to {kind} {bare!r}: {both}. Name the one you mean in the recipe "
                              f"({fixes}), or disable one (SYNFER_DISABLE_PLUGINS={found[-1].provider}).")
        return min(found, key=lambda p: kinds.index(p.kind))  # one provider: the slot's own kind first

    def get(self, kind: str, name: str) -> type[Stage]:
        return self.resolve(kind, name).cls

    def build(self, kind: str, block: dict):
        """Instantiate a stage from a recipe block {plugin: name, ...config}."""
        block = dict(block)
        info = self.resolve(kind, block.pop("plugin"))
        try:  # the Config's validators are plugin code too; a ValidationError names the field as it always did
            with plugin_code():
                config = info.cls.Config(**block)
        except (ValidationError, PluginError):
            raise
        except BaseException as exc:
            if (why := escaped(exc)) is None:
                raise
            raise PluginCallError(f"{info.label} failed in Config(): {why}") from exc
        with calling(info.label, "__init__"):
            stage = info.cls(config)
        if not isinstance(getattr(stage, "config", None), StageConfig):
            raise PluginContractError(f"{info.label} has no `config` after __init__ (an __init__ that does not call "
                                      "super().__init__(config)?); call it first, so the core and the plugin read the recipe's settings")
        try:
            stage._synfer_plugin = info  # lets the boundary checks name the provider
        except AttributeError:  # pragma: no cover - a stage with __slots__
            pass
        return stage

    # -------------------------------------------------------------- commands
    def add_commands(self, cli) -> None:
        """Let every plugin add its click commands, the built-ins first. A plugin whose hook fails loses only its
        commands; a command named like one synfer or another plugin already has (`synfer run`, `synfer train
        generator`) is left out with one warning naming both, so `--help` never lists two commands of one name."""
        groups = {"": cli}  # group path -> click group the plugins touched (`cli.subgroup("train")` -> "train")
        owners = {("", _norm(n)): BUILTIN for n in (*cli.commands, *getattr(cli, "lazy", ()))}  # (path, name) -> who has it
        impls = sorted(self.pm.hook.register_commands.get_hookimpls(), key=lambda i: self._provider.get(id(i.plugin)) != BUILTIN)
        for impl in impls:
            who = self._provider.get(id(impl.plugin), impl.plugin_name)
            before = {path: dict(g.commands) for path, g in groups.items()}

            def subgroup(name, _get=type(cli).subgroup):
                g = _get(cli, name)
                if name not in groups:  # first touch: what is there now is synfer's (or a plugin's already counted)
                    groups[name], before[name] = g, dict(g.commands)
                    owners.update({(name, _norm(n)): BUILTIN for n in g.commands if (name, _norm(n)) not in owners})
                return g

            cli.subgroup = subgroup  # shadows the method while this plugin's hook runs
            try:
                with plugin_code():
                    impl.function(cli=cli)
            except BaseException as exc:
                if (why := escaped(exc)) is None:
                    raise
                for path, g in groups.items():  # nothing of a failing hook stays
                    g.commands.clear()
                    g.commands.update(before[path])
                msg = f"synfer plugin {who} could not add its commands: {why}"
                self.failures.append((who, msg))
                _warn(msg, f"{who}:commands")
                continue
            finally:
                del cli.subgroup
            self._refuse_clashes(who, groups, before, owners)

    def _refuse_clashes(self, who: str, groups: dict, before: dict, owners: dict) -> None:
        for path, g in groups.items():
            old = before[path]
            for name, cmd in list(g.commands.items()):
                if old.get(name) is cmd:
                    continue
                owner = owners.get((path, _norm(name)))
                if owner is None:
                    owners[(path, _norm(name))] = who
                    continue
                if name in old:
                    g.commands[name] = old[name]
                else:
                    del g.commands[name]
                where = " ".join(filter(None, ("synfer", path, name)))
                had = "synfer itself" if owner == BUILTIN else f"synfer plugin {owner}"
                msg = f"synfer plugin {who} adds the command '{where}', which {had} already has; {who}'s is left out: rename it"
                self.failures.append((who, msg))
                _warn(msg, f"{who}:command:{where}")
            for name in set(old) - set(g.commands):  # a plugin never removes another's command
                g.commands[name] = old[name]


_REGISTRY: Registry | None = None


def pydantic_problems(exc: ValidationError, prefix: str = "") -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(err["loc"]))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this block; check the spelling)"
        elif "input" in err and err["type"] != "missing" and not isinstance(err["input"], (dict, list)):
            msg = f"{msg}, got {err['input']!r}"
        out.append(f"{loc}: {msg}")
    return out


def block_problems(kind: str, block: Any, path: str, registry) -> list[str]:
    """`validate` lines for one {plugin: name, ...config} block of kind `kind` at `path`: an unknown plugin, its Config's
    complaints, its `problems()`. A crash or sys.exit in the plugin's code is a line naming it."""
    if not isinstance(block, dict) or "plugin" not in block:
        return [f"{path}: expected a mapping with a 'plugin' key, got {block!r}"]
    block = dict(block)
    name = block.pop("plugin")
    try:
        cls = registry.get(kind, name)
    except PluginError as exc:
        return [f"{path}.plugin: {exc}"]
    try:  # plugin code (its Config's validators, its problems()): a crash or sys.exit in it is a line naming it
        with calling(cls, "Config"):
            try:
                config = cls.Config(**block)
            except ValidationError as exc:
                return pydantic_problems(exc, path)
        with calling(cls, "problems"):
            return [f"{path}.{line}" for line in cls.problems(config)]
    except PluginCallError as exc:
        return [f"{path}: {exc}"]



def loaded_registry() -> Registry | None:
    """The process's registry if it was loaded, else None (never loads plugins: error paths ask this)."""
    return _REGISTRY


def forget_registry() -> None:
    """Drop the process's registry, so the next `get_registry()` loads the entry points again (e.g. after
    `synfer -p NAME` changed which plugins load)."""
    global _REGISTRY
    _REGISTRY = None


def get_registry(reload: bool = False) -> Registry:
    global _REGISTRY
    if _REGISTRY is None or reload:
        reg = Registry()
        if os.environ.get("SYNFER_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0"):
            reg.load_entrypoints()
        _REGISTRY = reg
    return _REGISTRY
