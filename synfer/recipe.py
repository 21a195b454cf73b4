"""Recipes: YAML -> a validated `Recipe`, with key=value overrides from the CLI.

Validation builds every stage's Config without loading weights and reports every
problem in one error, each with its path (`generator.steps: ...`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from synfer import labels as L

# Stage blocks a recipe may hold: recipe key -> stage kind.
SINGLE_STAGES = {"prompter": "prompter", "generator": "generator", "guidance_classifier": "guidance_classifier", "calibrator": "calibrator"}


class RecipeError(ValueError):
    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AUPriorConfig(_Strict):
    low: float = Field(0.45, ge=0, le=1)   # intensity range of prototype AUs
    high: float = Field(1.0, ge=0, le=1)
    extra_rate: float = Field(0.0, ge=0, le=1)  # chance of each non-prototype AU switching on weakly


class VoteConfig(_Strict):
    rule: str = "paper"  # paper | soft-average | majority (synfer.ensemble.VOTE_RULES)
    threshold: float = Field(0.0, ge=0, le=1)  # relabel only when the experts' confidence reaches this; else drop
    prior_weight: float = Field(1.0, ge=0)  # weight of the preassigned label in soft-average / majority
    calibrator_weight: float = Field(1.0, ge=0)  # FERAnno's weight among the experts

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, v):
        from synfer.ensemble import VOTE_RULES

        if v not in VOTE_RULES:
            raise ValueError(f"no vote rule {v!r}; known: {', '.join(VOTE_RULES)}")
        return v


class Recipe(_Strict):
    seed: int = 0
    num_images: int = Field(64, gt=0)
    label_space: str = "affectnet8"
    expressions: dict[str, float] | list[str] | None = None  # the mix; None = every class equally
    output: str = "out/run"
    au_prior: AUPriorConfig = AUPriorConfig()
    prompter: dict[str, Any] = {"plugin": "template"}
    generator: dict[str, Any]
    guidance_classifier: dict[str, Any] | None = None  # semantic guidance (Eq. 4-6); None = off
    calibrator: dict[str, Any] | None = None  # FERAnno; None = experts only
    experts: list[dict[str, Any]] = []  # each {plugin, weight, ...config}
    vote: VoteConfig = VoteConfig()
    evaluators: list[dict[str, Any]] = []
    grid: bool = True  # write <output>-grid.png next to the dataset
    report: bool = True  # write <output>/report.html (synfer report)

    @field_validator("label_space")
    @classmethod
    def _space(cls, v):
        L.label_space(v)
        return v

    def mix(self) -> dict[str, float]:
        """Normalised expression mix in the recipe's label space."""
        space = L.label_space(self.label_space)
        if self.expressions is None:
            raw = {c: 1.0 for c in space}
        elif isinstance(self.expressions, list):
            raw = {L.canonical(c): 1.0 for c in self.expressions}
        else:
            raw = {L.canonical(c): float(w) for c, w in self.expressions.items()}
        total = sum(raw.values())
        return {c: w / total for c, w in raw.items() if w > 0}


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError([f"override {item!r}: expected key=value, e.g. generator.steps=10"], "command line")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value != "" else None


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`a.b.c=value` sets data['a']['b']['c'] (value parsed as YAML); list items by index (`experts.0.weight=2`)."""
    data = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, key in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[int(key)]
                continue
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node[key] = dict(node[key]) if isinstance(node[key], dict) else list(node[key])
            node = node[key]
        if isinstance(node, list):
            node[int(path[-1])] = value
        else:
            node[path[-1]] = value
    return data


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


def stage_problems(kind: str, block: Any, path: str, registry) -> list[str]:
    """Validate one {plugin: name, ...config} block against the plugin's Config."""
    from synfer.plugins import PluginError

    if not isinstance(block, dict) or "plugin" not in block:
        return [f"{path}: expected a mapping with a 'plugin' key, got {block!r}"]
    block = dict(block)
    name = block.pop("plugin")
    try:
        cls = registry.get(kind, name)
    except PluginError as exc:
        return [f"{path}.plugin: {exc}"]
    try:
        config = cls.Config(**block)
    except ValidationError as exc:
        return pydantic_problems(exc, path)
    return [f"{path}.{line}" for line in cls.problems(config)]


def expert_kind(registry, name: str) -> str:
    """Experts may be dedicated `expert` plugins or any guidance classifier."""
    return "expert" if ("expert", name) in registry.plugins or ("guidance_classifier", name) not in registry.plugins else "guidance_classifier"


def validate_data(data: dict, registry=None, source: str = "recipe") -> Recipe:
    from synfer.plugins import get_registry

    registry = registry or get_registry()
    problems: list[str] = []
    recipe = None
    try:
        recipe = Recipe(**data)
    except ValidationError as exc:
        problems += pydantic_problems(exc)
    # Stage blocks are checked even when the top level failed, so every error shows at once.
    for key, kind in SINGLE_STAGES.items():
        block = data.get(key, Recipe.model_fields[key].default)
        if block is not None and isinstance(block, dict):
            problems += stage_problems(kind, block, key, registry)
    for i, block in enumerate(data.get("experts") or []):
        if isinstance(block, dict) and "plugin" in block:
            if not isinstance(block.get("weight", 1.0), (int, float)) or block.get("weight", 1.0) < 0:
                problems.append(f"experts.{i}.weight: must be a number >= 0, got {block.get('weight')!r}")
            member = {k: v for k, v in block.items() if k not in ("weight", "align")}  # the ensemble's settings, not the plugin's
            problems += stage_problems(expert_kind(registry, block["plugin"]), member, f"experts.{i}", registry)
            if "align" in block:
                from synfer.align import align_problems

                problems += align_problems(block["align"], f"experts.{i}.align", registry)
        else:
            problems.append(f"experts.{i}: expected a mapping with a 'plugin' key, got {block!r}")
    for i, block in enumerate(data.get("evaluators") or []):
        problems += stage_problems("evaluator", block, f"evaluators.{i}", registry)
    if recipe is not None:
        space = L.label_space(recipe.label_space)
        try:
            for c in recipe.mix():
                if c not in space:
                    problems.append(f"expressions: {c!r} is not in label space {recipe.label_space} ({', '.join(space)})")
        except ValueError as exc:
            problems.append(f"expressions: {exc}")
    if problems:
        raise RecipeError(problems, source)
    return recipe


def read_yaml(path: str | Path, overrides=()) -> dict:
    """A recipe file as a mapping, with key=value overrides applied; clear errors otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError([f"not valid YAML: {exc}"], str(path))
    if not isinstance(data, dict):
        raise RecipeError([f"expected a mapping at the top level, got {type(data).__name__}"], str(path))
    return apply_overrides(data, overrides)


def load_recipe(path: str | Path, overrides=(), registry=None) -> Recipe:
    return validate_data(read_yaml(path, overrides), registry, str(path))
