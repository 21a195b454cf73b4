"""The plugin contract, checked at the boundary between the core and a plugin.

At registration (`stage_problems`): a known kind and name, every abstract method
implemented, a strict `Config` subclassing StageConfig, a known label space for stages
that predict classes. At use: guidance classifiers return floating logits of shape
(N, classes) that carry the gradient (`GuardedClassifier`); experts and calibrators return
finite probabilities, rows summing to 1, or declare `outputs = "logits"` and the core
applies the softmax (`expert_probs`). Errors raised inside a plugin become one line naming it
(`calling`). Every failure is one sentence: the plugin, what it returned, what was expected.
No torch at import time.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any

import numpy as np

from synfer import labels as L
from synfer.stages import STAGE_KINDS, Stage, StageConfig

# Kinds whose stages predict classes and so must say in which label space.
PREDICTING = ("guidance_classifier", "expert", "calibrator")
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
    """Re-raise an exception from inside a plugin as a PluginCallError naming it (the traceback stays chained)."""
    try:
        yield
    except PluginError:
        raise
    except Exception as exc:
        raise PluginCallError(f"{describe(stage)} failed in {method}(): {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------- registration


def stage_problems(cls: Any, provider: str, known_spaces: set[str]) -> list[str]:
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


def check_logits(stage, images, logits, space: str):
    """Check a guidance classifier's forward(): floating (N, classes) logits that carry the gradient."""
    import torch

    _same_space(stage, space)
    n, c, who = int(images.shape[0]), len(L.label_space(space)), describe(stage)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = f"a {logits.dtype} tensor" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise PluginContractError(f"{who} returned {got} from forward(); expected a floating torch tensor of logits ({n}, {c})")
    if tuple(logits.shape) != (n, c):
        raise PluginContractError(f"{who} returned logits of shape {tuple(logits.shape)} for {n} image(s); expected ({n}, {c}), "
                                  f"a column per class of {space}")
    if torch.is_grad_enabled() and images.requires_grad and not logits.requires_grad:
        raise PluginContractError(f"{who} returned logits that carry no gradient (detached, or computed under no_grad or "
                                  "through numpy); semantic guidance differentiates them with respect to the image")
    d = logits.detach()
    if bool(torch.isfinite(d).all()) and bool((d >= 0).all()) and bool(((d.sum(1) - 1).abs() <= ROW_SUM_TOL).all()):
        raise PluginContractError(f"{who} returned probabilities from forward() (each row is non-negative and sums to 1); "
                                  "expected logits, the scores before the softmax: guidance with probabilities is silently weaker")
    return logits


class Guarded:
    """A stage as the core calls it: the same object (attributes pass through), with the contract
    methods' errors re-raised as one line naming the plugin."""

    methods: tuple[str, ...] = ()

    def __init__(self, stage, *methods: str):
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_methods", methods or self.methods)

    def __getattr__(self, name):
        if name in ("_stage", "_methods", "_space"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        value = getattr(self._stage, name)
        if name in self._methods:
            def call(*args, **kwargs):
                with calling(self._stage, name):
                    return value(*args, **kwargs)
            return call
        return value

    def __setattr__(self, name, value):
        setattr(self._stage, name, value)


class GuardedClassifier(Guarded):
    """A guidance classifier as the generator sees it, with forward() checked as well."""

    def __init__(self, stage):
        super().__init__(stage, "forward")
        object.__setattr__(self, "_space", label_space_of(stage))

    def forward(self, images):
        with calling(self._stage, "forward"):
            out = self._stage.forward(images)
        return check_logits(self._stage, images, out, self._space)

    @property
    def label_space(self) -> str:
        return self._space


def guidance_targets(classifier, requests) -> tuple[list[int], list[bool]]:
    """Eq. 5's target class per request in the classifier's label space, and whether it can see that class.
    A request whose class it cannot see is marked `guided = False` (written to the sample's metadata)."""
    space = L.label_space(classifier.label_space)
    targets, mask = [], []
    for r in requests:
        c = L.canonical(r.expression)
        targets.append(space.index(c) if c in space else 0)
        mask.append(c in space)
        r.guided = c in space
    return targets, mask
