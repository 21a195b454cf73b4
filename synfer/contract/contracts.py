"""The plugin contract, checked at the boundary between the core and a plugin.

At registration (`class_problems`): a known kind and name, every abstract method
implemented, a strict `Config` subclassing StageConfig, a known label space for stages
that predict classes. At use: guidance classifiers return floating logits of shape
(N, classes) that carry the gradient (`GuardedClassifier`, synfer.contract.guidance_contract); experts and calibrators return
finite probabilities, rows summing to 1, or declare `outputs = "logits"` and the core
applies the softmax (`expert_probs`). Errors raised inside a plugin become one line naming it
(`calling`), `sys.exit()` and a self-raised KeyboardInterrupt included (synfer.contract.isolation); its
prints go to stderr. Plugins get copies of the images they judge (`private_samples`), so the
written files are always the generated ones; an evaluator that changes the dataset is named.
Every failure is one sentence: the plugin, what it returned, what was expected.
No torch at import time.
"""
from __future__ import annotations

import copy
import inspect
import os
import warnings
from array import array
from contextlib import contextmanager
from typing import Any

import numpy as np

from synfer.contract import labels as L
from synfer.contract.isolation import escaped, plugin_code
from synfer.contract.rows import IMAGES, METADATA
from synfer.contract.stages import STAGE_KINDS, Stage, StageConfig

# Read off the stage classes (synfer.contract.stages): kinds whose stages predict classes and so must say in which
# label space; keys the core reads from a kind's recipe block before the rest becomes the plugin's Config
# (synfer.engine.recipe, synfer.engine.pipeline, synfer.engine.align): a Config field of that name would never see its value.
PREDICTING = tuple(kind for kind, cls in STAGE_KINDS.items() if cls.predicts)
RESERVED = {kind: cls.reserved for kind, cls in STAGE_KINDS.items()}
OUTPUTS = ("probabilities", "logits")
ROW_SUM_TOL = 1e-3


class PluginError(Exception):
    pass


class PluginContractError(PluginError):
    """A plugin broke the contract: at registration, or in what one of its methods returned."""


class PluginCallError(PluginError):
    """An exception raised inside a plugin's method, re-raised as one line naming the plugin (the cause is chained)."""


def describe(stage) -> str:
    """'expert 'x' (from acme)' for a built stage, a stage class, or a ready-made label."""
    if isinstance(stage, str):
        return stage
    info = getattr(stage, "_synfer_plugin", None)
    if info is not None:
        return info.label
    cls = stage if isinstance(stage, type) else type(stage)
    return f"{getattr(cls, 'kind', 'plugin')} {getattr(cls, 'name', cls.__name__)!r} ({cls.__module__})"


@contextmanager
def calling(stage, method: str):
    """Run plugin code: an exception from inside it (sys.exit() too) is re-raised as a PluginCallError naming it
    (the traceback stays chained), a real Ctrl-C passes unchanged, and its prints go to stderr."""
    try:
        with plugin_code():
            yield
    except PluginError:
        raise
    except BaseException as exc:
        why = escaped(exc)
        if why is None:
            raise
        raise PluginCallError(f"{describe(stage)} failed in {method}(): {why}") from exc


# ---------------------------------------------------------------- registration


def class_problems(cls: Any, provider: str, known_spaces: set[str]) -> list[str]:
    """What is wrong with a stage class a plugin registers (empty: nothing)."""
    if not (isinstance(cls, type) and issubclass(cls, Stage)) or getattr(cls, "kind", None) not in STAGE_KINDS:
        return [f"{provider} registered {cls!r}, which is not a subclass of a synfer stage ({', '.join(STAGE_KINDS)})"]
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or ":" in name:
        return [f"{provider} registered {cls.__name__} with name {name!r}; expected a non-empty `name` without ':'"]
    who = f"{cls.kind} {name!r} ({cls.__module__}.{cls.__name__}, from {provider})"
    out = []
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        out.append(f"{who} does not implement {missing}, required of every {cls.kind}")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, StageConfig)):
        out.append(f"{who} has a Config that is not a synfer.stages.StageConfig ({config!r}); subclass StageConfig, "
                   "which refuses unknown keys, so a typo in a recipe is an error and not silently ignored")
    elif config.model_config.get("extra") != "forbid":
        out.append(f"{who} sets extra={config.model_config.get('extra')!r} in its Config; expected 'forbid' (StageConfig's), "
                   "so a typo in a recipe is an error")
    else:
        reserved = reserved_names(cls.kind)
        taken = [n for n in _field_names(config) if n in reserved]
        if taken:
            out.append(f"{who} declares Config field(s) {', '.join(map(repr, taken))}, which the core reads from the same recipe block "
                       f"(reserved in {cls.kind} blocks: {', '.join(reserved)}); rename them (docs/plugins.md, Reserved names)")
    if cls.kind in PREDICTING:
        space = inspect.getattr_static(cls, "label_space", None)
        if space is None:
            out.append(f"{who} declares no label_space; set `label_space = \"affectnet8\"` (or another of "
                       f"{', '.join(sorted(known_spaces))}), or a property that reads it from the weights' config")
        elif isinstance(space, str) and space not in known_spaces:
            out.append(f"{who} declares label_space {space!r}, which is unknown; known: {', '.join(sorted(known_spaces))} "
                       "(a plugin adds one with the register_label_spaces hook)")
        elif not isinstance(space, (str, property)):
            out.append(f"{who} declares label_space as {type(space).__name__}; expected a string or a property returning one")
    outputs = getattr(cls, "outputs", "probabilities")
    if cls.kind in ("expert", "calibrator") and outputs not in OUTPUTS:
        out.append(f"{who} declares outputs={outputs!r}; expected one of {', '.join(OUTPUTS)}")
    return out


def reserved_names(kind: str) -> tuple[str, ...]:
    """Keys of a `kind` recipe block that the core reads itself (never a plugin's Config field)."""
    return RESERVED.get(kind, Stage.reserved)


def _field_names(config: type) -> list[str]:
    """Every key a Config accepts: field names and their aliases."""
    names = []
    for name, f in config.model_fields.items():
        names += [name] + [a for a in (f.alias, f.validation_alias) if isinstance(a, str) and a != name]
    return names


def label_space_of(stage) -> str:
    """A built stage's label space, checked: the core reads it before the first prediction."""
    with calling(stage, "label_space"):
        space = stage.label_space
    if not isinstance(space, str) or space not in L.LABEL_SPACES:
        raise PluginContractError(f"{describe(stage)} has label_space {space!r}; expected one of {', '.join(L.LABEL_SPACES)}")
    return space


def _same_space(stage, space: str) -> None:
    now = getattr(stage, "label_space", space)
    if now != space:
        raise PluginContractError(
            f"{describe(stage)} changed its label_space from {space} to {now} while predicting (on loading its weights?); "
            f"the core reads label_space before the first call, so declare it up front: a property that reads the weights' config")


# ---------------------------------------------------------------- outputs


def expert_probs(stage, probs, n: int, space: str, outputs: str = "probabilities") -> np.ndarray:
    """Check what an expert or calibrator returned for `n` images; probabilities (n, classes) in `space`."""
    _same_space(stage, space)
    c = len(L.label_space(space))
    who = describe(stage)
    probs = _to_numpy(who, probs)
    try:
        p = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PluginContractError(f"{who} returned {type(probs).__name__}, not numbers ({exc}); expected an array ({n}, {c})") from None
    if p.shape != (n, c):
        hint = " (transposed? rows are images, columns the classes)" if p.shape == (c, n) else ""
        raise PluginContractError(f"{who} returned shape {p.shape} for {n} image(s); expected ({n}, {c}): a row per image, "
                                  f"a column per class of {space}{hint}")
    bad = ~np.isfinite(p).all(1)
    if bad.any():
        raise PluginContractError(f"{who} returned non-finite values (NaN or inf) for {int(bad.sum())} of {n} image(s); "
                                  f"expected finite {'logits' if outputs == 'logits' else 'probabilities'}")
    if outputs == "logits":
        if (p >= 0).all() and np.abs(p.sum(1) - 1).max() <= ROW_SUM_TOL and c > 1:
            raise PluginContractError(f"{who} declares outputs = \"logits\" but returned probabilities (each row non-negative, summing to 1); "
                                      "the core would apply the softmax a second time. Drop `outputs = \"logits\"`, or return the "
                                      "scores before the softmax")
        e = np.exp(p - p.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    sums = p.sum(1)
    if (p < 0).any() or np.abs(sums - 1).max() > ROW_SUM_TOL:
        what = (f"negative values (min {p.min():.3g}; log-probabilities or logits?)" if (p < 0).any()
                else f"rows summing to {sums.min():.3g}..{sums.max():.3g}")
        if n == c and np.abs(p.sum(0) - 1).max() <= ROW_SUM_TOL and (p >= 0).all():
            what += " whose columns sum to 1 (a transposed (classes, N) array?)"
        raise PluginContractError(f"{who} returned {what}; expected probabilities (non-negative, each row summing to 1). "
                                  "A plugin that returns logits sets `outputs = \"logits\"` and the core applies the softmax")
    return p


def private_samples(samples: list) -> list:
    """Copies of generated samples for one plugin to judge: its own images, requests and extras, so a plugin that
    changes them in place (equalises an image, crops it) reaches neither the files written nor the next voter."""
    return [type(s)(request=copy.deepcopy(s.request), image=s.image.copy(), extra=copy.deepcopy(s.extra))
            if hasattr(getattr(s, "image", None), "copy") else s for s in samples]


_told_touched: set[str] = set()


def check_untouched(stage, originals: list, copies: list, method: str = "predict") -> None:
    """Warn once per plugin that changed the images it was handed (harmless: they were copies, see private_samples)."""
    who = describe(stage)
    changed = sum(a is not b and (a.image.mode != b.image.mode or a.image.size != b.image.size or a.image.tobytes() != b.image.tobytes())
                  for a, b in zip(originals, copies))
    if changed and who not in _told_touched:
        _told_touched.add(who)
        warnings.warn(f"{who} changed {changed} of the {len(copies)} image(s) it was given in {method}(); it was handed copies, "
                      "so the dataset and the other voters are unaffected, but its votes judged its own edits. Copy an "
                      "image before changing it (image.copy())", UserWarning, stacklevel=2)


def _to_numpy(who: str, out):
    """A torch tensor an expert returned, as numpy: detached, on the CPU, float32 (a meta tensor holds no values)."""
    if type(out).__module__.split(".")[0] != "torch" or not hasattr(out, "detach"):
        return out
    if out.device.type == "meta":
        raise PluginContractError(f"{who} returned a tensor on the meta device, which holds no values (weights never loaded?); "
                                  "expected probabilities as a numpy array or a tensor on the CPU or GPU")
    return out.detach().float().cpu().numpy()


class Guarded:
    """A stage as the core calls it: the same object (attributes pass through), with the contract
    methods' errors re-raised as one line naming the plugin. An evaluator's evaluate() is checked to leave the
    dataset's images and metadata as they were; a generator's generate() tells its guidance which samples are real."""

    methods: tuple[str, ...] = ()

    def __init__(self, stage, *methods: str):
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_methods", methods or self.methods)

    def __getattr__(self, name):
        if name.startswith("_") and name in ("_stage", "_methods", "_space", "_real", "_probed"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        value = getattr(self._stage, name)
        if name in self._methods:
            def call(*args, **kwargs):
                with calling(self._stage, name), _around(self._stage, name, args, kwargs):
                    return value(*args, **kwargs)
            return call
        return value

    def __setattr__(self, name, value):
        setattr(self._stage, name, value)


@contextmanager
def _around(stage, method: str, args, kwargs):
    guidance = kwargs.get("guidance", args[1] if len(args) > 1 else None)
    if method == "generate" and getattr(type(guidance), "told_real_samples", False):  # a GuardedClassifier
        object.__setattr__(guidance, "_real", list(args[0] if args else kwargs.get("requests", [])))
        try:
            yield
        finally:
            object.__setattr__(guidance, "_real", None)
    elif method == "evaluate" and getattr(stage, "kind", None) == "evaluator":
        folder = args[0] if args else kwargs.get("dataset")
        before = dataset_state(folder)
        yield
        changed = changed_files(folder, before, dataset_state(folder))
        if changed:
            raise PluginContractError(f"{describe(stage)} changed the dataset it measured ({len(changed)} file(s): "
                                      f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); an evaluator reads "
                                      "images/ and metadata.jsonl and never writes them: rerun the generation for those samples")
    else:
        yield


def _dataset_files(folder):
    """(relative name, size, mtime_ns) of a dataset's metadata and images (also in images/'s sub-folders, the
    `images_per_folder` layout), streamed from the listing."""
    subs = [folder, os.path.join(folder, IMAGES)]
    while subs:
        sub = subs.pop(0)
        try:
            entries = os.scandir(sub)
        except OSError:
            continue
        with entries:
            for e in entries:
                if e.is_file() and (sub != folder or e.name == METADATA):
                    st = e.stat()
                    yield os.path.relpath(e.path, folder), st.st_size, st.st_mtime_ns
                elif sub != folder and e.is_dir(follow_symlinks=False):
                    subs.append(e.path)


def dataset_state(folder):
    """What a dataset's metadata and images are, to tell whether a plugin wrote into them: per file a hash of its
    name and one of its (size, mtime), sorted, 16 bytes a file (a million-image dataset is not a dict of names)."""
    names, stats = array("q"), array("q")
    for name, size, mtime in _dataset_files(folder):
        names.append(hash(name))
        stats.append(hash((size, mtime)))
    order = np.argsort(np.frombuffer(names, np.int64), kind="stable")
    return np.frombuffer(names, np.int64)[order], np.frombuffer(stats, np.int64)[order]


def changed_files(folder, before, after) -> list[str]:
    """The files (relative names, sorted) written, added or removed between two `dataset_state`s; [] when none."""
    if len(before[0]) == len(after[0]) and np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1]):
        return []
    was = set(zip(before[0].tolist(), before[1].tolist()))
    now = set(after[0].tolist())
    out = sorted(name for name, size, mtime in _dataset_files(folder) if (hash(name), hash((size, mtime))) not in was)
    gone = sum(1 for k in set(before[0].tolist()) if k not in now)
    return out + [f"{gone} removed file(s)"] * bool(gone)
