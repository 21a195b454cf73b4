"""Recipes: YAML -> a validated `Recipe`, with key=value overrides from the CLI.

Every recipe kind (run, FEText, downstream benchmark) is a `RecipeModel` and goes through
`validate_recipe`: its fields (shared types `LabelSpaceName`, `Seed`, `Mix`, `OutputDir`),
every stage block against its plugin's Config (no weights loaded), then cheap checks. Every
problem shows in one error, each with its path (`generator.steps: ...`); a malformed
override is a problem quoting the override.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from synfer.contract import labels as L
from synfer.contract.stages import Expert, Stage
from synfer.engine.align import align_problems
from synfer.engine.ensemble import VOTE_RULES
from synfer.engine.registry import block_problems, get_registry, pydantic_problems
from synfer.engine.threads import parse as parse_threads


class RecipeError(ValueError):
    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


# A run of more images than this is refused: 7x the paper's largest set (1.4 million), and
# more than one output folder should hold (split it into several runs with their own seeds).
MAX_IMAGES = 10_000_000


def _known_space(v: str) -> str:
    L.label_space(v)
    return v


def _mix_weights(v):
    """A mix is a non-empty list of class names, or name -> weight with weights >= 0 summing above 0."""
    if v is None:
        return v
    names = list(v)
    if not names:
        raise ValueError("the expression mix is empty; name at least one class, or leave it out for every class equally")
    for name in names:
        L.canonical(name)  # unknown names fail here, listing the known ones
    if isinstance(v, dict):
        bad = {k: w for k, w in v.items() if not (w >= 0 and w < float("inf"))}
        if bad:
            raise ValueError(f"expression weights must be finite numbers >= 0, got {bad}")
        if sum(v.values()) <= 0:
            raise ValueError(f"expression weights sum to 0 ({v}): no class could be drawn; give at least one class a weight above 0")
    return v


def _not_a_file(v: str) -> str:
    path = Path(v)
    if path.exists() and not path.is_dir():
        raise ValueError("this is a file; expected a folder (new, or one this recipe wrote before). Pick another output=...")
    return v


LabelSpaceName = Annotated[str, AfterValidator(_known_space)]  # a key of synfer.contract.labels.LABEL_SPACES
Seed = Annotated[int, Field(ge=0)]  # numpy seed sequences take only non-negative integers
OutputDir = Annotated[str, AfterValidator(_not_a_file)]  # a dataset folder, existing or not, never a file
Threads = Annotated[int | str, AfterValidator(parse_threads)]  # "auto" or a positive int
Mix = Annotated[dict[str, float] | list[str] | None, AfterValidator(_mix_weights)]  # None = every class equally


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipeModel(_Strict):
    """A recipe kind (run, FEText, benchmark): its own fields, plus the stage blocks it holds.

    `stage_slots` maps a key holding one `{plugin: name, ...}` block to its stage kind,
    `stage_lists` a key holding a list of them. `validate_recipe` checks them all against the
    plugins' Configs; `problems()` adds the cheap checks of a valid recipe (paths, ...)."""

    stage_slots: ClassVar[dict[str, str]] = {}
    stage_lists: ClassVar[dict[str, str]] = {}

    @classmethod
    def item_problems(cls, key: str, i: int, block: Any, registry) -> list[str]:
        return block_problems(cls.stage_lists[key], block, f"{key}.{i}", registry)

    def problems(self) -> list[str]:
        return []


class AUPriorConfig(_Strict):
    low: float = Field(0.45, ge=0, le=1)   # intensity range of prototype AUs
    high: float = Field(1.0, ge=0, le=1)
    extra_rate: float = Field(0.0, ge=0, le=1)  # chance of each non-prototype AU switching on weakly
    extra_high: float = Field(0.45, ge=0.1, le=1)  # ... at an intensity in [0.1, extra_high]; `synfer labels --fit DIR` fits all four

    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high}); expected low <= high (the intensity range of prototype AUs)")
        return self


class VoteConfig(_Strict):
    rule: str = "paper"  # paper | soft-average | majority (synfer.engine.ensemble.VOTE_RULES)
    threshold: float = Field(0.0, ge=0, le=1)  # relabel only when the experts' confidence reaches this; else drop
    prior_weight: float = Field(1.0, ge=0)  # weight of the preassigned label in soft-average / majority
    calibrator_weight: float = Field(1.0, ge=0)  # FERAnno's weight among the experts

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, v):
        if v not in VOTE_RULES:
            raise ValueError(f"no vote rule {v!r}; known: {', '.join(VOTE_RULES)}")
        return v


class Recipe(RecipeModel):
    stage_slots: ClassVar[dict[str, str]] = {"prompter": "prompter", "generator": "generator",
                                             "guidance_classifier": "guidance_classifier", "calibrator": "calibrator"}
    stage_lists: ClassVar[dict[str, str]] = {"experts": "expert", "evaluators": "evaluator"}

    seed: Seed = 0
    num_images: int = Field(64, gt=0, le=MAX_IMAGES)
    label_space: LabelSpaceName = "affectnet8"
    expressions: Mix = None  # the mix; None = every class equally
    output: OutputDir = "out/run"
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
    threads: Threads = "auto"  # CPU threads, set once at start; auto: OMP_NUM_THREADS if set, else free cores split by torchrun workers
    # (cores minus load average, at least 1; synfer/engine/threads.py). Never blocks a resume
    images_per_folder: int | None = Field(None, ge=1)  # None: one flat images/ folder; N: images/<index // N>/, at most N files a folder
    # (10000 at 1M+ images, docs/results.md). Changes file_name, not pixels; a rerun with another value is refused

    @model_serializer(mode="wrap")
    def _flat_layout_unsaid(self, handler):
        """The default flat layout is left out of a dump, so recipe.json (and the card's recipe hash) of a flat run
        are the bytes they were before `images_per_folder` existed; a set value is recorded and checked on resume."""
        data = handler(self)
        if isinstance(data, dict) and self.images_per_folder is None:
            data.pop("images_per_folder", None)
        return data

    @classmethod
    def item_problems(cls, key, i, block, registry):
        if key != "experts":
            return super().item_problems(key, i, block, registry)
        if not (isinstance(block, dict) and "plugin" in block):
            return [f"experts.{i}: expected a mapping with a 'plugin' key, got {block!r}"]
        out = []
        weight = block.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            out.append(f"experts.{i}.weight: must be a number >= 0, got {weight!r}")
        member = expert_member(block)
        out += block_problems(expert_kind(registry, block["plugin"]), member, f"experts.{i}", registry)
        if "align" in block:  # detect and align faces before this expert sees them (synfer.engine.align)

            out += align_problems(block["align"], f"experts.{i}.align", registry)
        return out

    def problems(self) -> list[str]:
        space = L.label_space(self.label_space)
        out = [f"expressions: {c!r} is not in label space {self.label_space} ({', '.join(space)})" for c in self.mix() if c not in space]
        return out

    def mix(self) -> dict[str, float]:
        """Normalised expression mix in the recipe's label space (classes of weight 0 left out)."""
        space = L.label_space(self.label_space)
        if self.expressions is None:
            raw = {c: 1.0 for c in space}
        elif isinstance(self.expressions, list):
            raw = {L.canonical(c): 1.0 for c in self.expressions}
        else:
            raw = {L.canonical(c): float(w) for c, w in self.expressions.items()}
        total = sum(raw.values())
        return {c: w / total for c, w in raw.items() if w > 0}


# ---------------------------------------------------------------- overrides


def _override_problem(item: str, what: str) -> str:
    return f"override {item!r}: {what}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (['a', 'b', '0', 'c'], value parsed as YAML); RecipeError quoting `item` otherwise."""
    if "=" not in item:
        raise RecipeError([_override_problem(item, "expected key=value, e.g. generator.steps=10")], "command line")
    key, value = item.split("=", 1)
    path = key.strip().split(".")
    if not key.strip() or any(not p.strip() for p in path):
        raise RecipeError([_override_problem(item, "the key has an empty part; expected dotted names like generator.steps=10 "
                                                   "or experts.0.weight=2")], "command line")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise RecipeError([_override_problem(item, f"the value {value!r} is not valid YAML ({first}); quote it, "
                                                   "or close the bracket, e.g. key=[1, 2]")], "command line") from None
    return [p.strip() for p in path], parsed


def _list_index(item: str, node: list, key: str, where: str) -> int:
    if not key.lstrip("-").isdigit():
        raise RecipeError([_override_problem(item, f"{where} is a list: expected an item number (0..{len(node) - 1}), got {key!r}")], "command line")
    i = int(key)
    if not 0 <= i < len(node):
        have = f"items 0..{len(node) - 1}" if node else "no items"
        raise RecipeError([_override_problem(item, f"{where} has {have}, so there is no item {i}; add the item in the recipe file first")],
                          "command line")
    return i


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], problems: list[str] | None = None) -> dict:
    """`a.b.c=value` sets data['a']['b']['c'] (value parsed as YAML); list items by index (`experts.0.weight=2`).

    A malformed override is a RecipeError quoting it; with a `problems` list, its line is
    appended there instead and the other overrides still apply (so `validate` lists all).

    `block.plugin=other` on a block naming another plugin starts that block afresh: the file's settings of the old
    plugin (e.g. retinaface's `threshold`) are dropped; settings given by overrides are kept, whatever their order."""
    data = copy.deepcopy(dict(data))
    given: set[tuple[str, ...]] = set()  # dotted paths set by an override
    for item in overrides:
        try:
            path, value = parse_override(item)
            given.add(tuple(path))
            node = data
            for i, key in enumerate(path[:-1]):
                where = ".".join(path[:i]) or "the recipe"
                if isinstance(node, list):
                    node = node[_list_index(item, node, key, where)]
                    continue
                if not isinstance(node.get(key), (dict, list)):
                    node[key] = {}
                node = node[key]
            if isinstance(node, list):
                node[_list_index(item, node, path[-1], ".".join(path[:-1]))] = value
            else:
                if path[-1] == "plugin" and node.get("plugin") not in (None, value):
                    for key in [k for k in node if k != "plugin" and (*path[:-1], k) not in given]:
                        del node[key]  # the old plugin's settings from the file
                node[path[-1]] = value
        except RecipeError as exc:
            if problems is None:
                raise
            problems += exc.problems
    return data


# Keys of an expert block the core's ensemble reads itself (vote weight, face alignment); the rest is the plugin's Config.
ENSEMBLE_KEYS = tuple(k for k in Expert.reserved if k not in Stage.reserved)  # ("weight", "align")


def expert_member(block: dict) -> dict:
    """An expert block without the ensemble's keys: what the plugin's Config receives."""
    return {k: v for k, v in block.items() if k not in ENSEMBLE_KEYS}


def expert_kind(registry, name: str) -> str:
    """Experts may be dedicated `expert` plugins or any guidance classifier."""
    return "expert" if ("expert", name) in registry.plugins or ("guidance_classifier", name) not in registry.plugins else "guidance_classifier"


def validate_recipe(model: type[RecipeModel], data: dict, registry=None, source: str = "recipe", problems=()):
    """The one validation path of every recipe kind: the model's own fields, every stage block
    against its plugin's Config (even when the top level failed), then the model's cheap checks.
    Every problem shows at once, `problems` (e.g. from overrides) first."""
    if registry is None and (model.stage_slots or model.stage_lists):
        registry = get_registry()
    problems = list(problems)
    recipe = None
    try:
        recipe = model(**data)
    except ValidationError as exc:
        problems += pydantic_problems(exc)
    for key, kind in model.stage_slots.items():
        block = data.get(key, model.model_fields[key].default)
        if isinstance(block, dict):
            problems += block_problems(kind, block, key, registry)
    for key in model.stage_lists:
        items = data.get(key)
        for i, block in enumerate(items if isinstance(items, list) else []):
            problems += model.item_problems(key, i, block, registry)
    if recipe is not None:
        problems += recipe.problems()
    if problems:
        raise RecipeError(problems, source)
    return recipe


def validate_data(data: dict, registry=None, source: str = "recipe", problems=()) -> Recipe:
    return validate_recipe(Recipe, data, registry, source, problems)


def read_yaml(path: str | Path, overrides=(), problems: list[str] | None = None) -> dict:
    """A recipe file as a mapping, with key=value overrides applied; clear errors otherwise
    (override problems go to `problems` when given, see `apply_overrides`)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError([f"not valid YAML: {exc}"], str(path))
    if not isinstance(data, dict):
        raise RecipeError([f"expected a mapping at the top level, got {type(data).__name__}"], str(path))
    return apply_overrides(data, overrides, problems)


def load_recipe(path: str | Path, overrides=(), registry=None) -> Recipe:
    problems: list[str] = []
    data = read_yaml(path, overrides, problems)
    return validate_data(data, registry, str(path), problems)
