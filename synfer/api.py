"""The Python API: the command line's jobs as functions, for notebooks and scripts (docs/api.md).

    import synfer
    data = synfer.run("recipes/quickstart.yaml", num_images=16, output="out/x", generator={"steps": 10})
    data.to_datasets().filter(lambda kept: kept, input_columns="kept")

A recipe is a path, a mapping or a `Recipe`. Settings are keyword arguments: a mapping merges into the
recipe's block (`generator={"steps": 10}` keeps the file's other generator settings; a new `plugin`
starts the block afresh, as on the command line), anything else replaces the key. Dotted command-line
overrides work too, as positional strings (`"experts.0.weight=2"`). `device=` puts every stage whose
Config has a `device` on that device. Nothing here imports a plugin or torch until a stage is built.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from synfer.commands.label import LabelRecipe, label_folder
from synfer.commands.report import write_report
from synfer.contract import labels as L
from synfer.engine.dataset import DatasetError, collect_rows, open_rgb, read_metadata, row_label
from synfer.engine.pipeline import plan as make_plan
from synfer.engine.pipeline import run_recipe
from synfer.engine.recipe import Recipe, RecipeError, apply_overrides, expert_kind, read_yaml, validate_recipe
from synfer.engine.registry import PluginError, get_registry
from synfer.engine.resume import ResumeMismatch, check_resume
from synfer.engine.threads import configure

__all__ = ["Dataset", "label", "load_recipe", "open_dataset", "plan", "run", "stage", "validate"]


# ---------------------------------------------------------------- recipes


def _overrides(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """Keyword settings as `key=value` overrides (JSON is YAML): mappings merge key by key, the rest replaces."""
    out = []
    for key, value in settings.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            plugin = {"plugin": value["plugin"]} if "plugin" in value else {}  # first: a new plugin starts the block afresh
            out += _overrides(plugin, f"{path}.") + _overrides({k: v for k, v in value.items() if k != "plugin"}, f"{path}.")
        else:
            out.append(f"{path}={json.dumps(value, default=str)}")
    return out


def _data(recipe) -> tuple[dict, str]:
    """A recipe given as a path, a mapping or a pydantic model -> (mapping, name for messages)."""
    if isinstance(recipe, (str, os.PathLike)):
        if not Path(recipe).is_file():
            raise RecipeError([f"no recipe file {str(recipe)!r}; expected a YAML recipe such as recipes/quickstart.yaml"], str(recipe))
        return read_yaml(recipe), str(recipe)
    if isinstance(recipe, dict):
        return dict(recipe), "recipe"
    if hasattr(recipe, "model_dump"):
        return recipe.model_dump(mode="json", exclude_unset=True), "recipe"
    raise TypeError(f"recipe: expected a path, a mapping or a Recipe, got {type(recipe).__name__}")


def _with_device(model, data: dict, device: str | None, registry) -> dict:
    """Every stage block of `data` whose plugin's Config has a `device` field, set to `device`."""
    if device is None:
        return data

    def put(kind: str, block):
        if not isinstance(block, dict) or "plugin" not in block:
            return block
        try:
            cls = registry.get(expert_kind(registry, block["plugin"]) if kind == "expert" else kind, block["plugin"])
        except PluginError:
            return block  # validation names the unknown plugin
        return {**block, "device": device} if "device" in cls.Config.model_fields else block

    data = dict(data)
    for key, kind in model.stage_slots.items():
        if key in data:
            data[key] = put(kind, data[key])
        elif isinstance(model.model_fields[key].default, dict):
            data[key] = put(kind, dict(model.model_fields[key].default))
    for key, kind in model.stage_lists.items():
        if isinstance(data.get(key), list):
            data[key] = [put(kind, b) for b in data[key]]
    return data


def _resolve(model, recipe, overrides: Sequence[str], settings: dict, device: str | None, registry, drop=()):
    reg = registry or get_registry()
    data, source = _data(recipe)
    problems: list[str] = []
    data = apply_overrides(data, [*overrides, *_overrides(settings)], problems)
    data = {k: v for k, v in data.items() if k not in drop}
    return validate_recipe(model, _with_device(model, data, device, reg), reg, source, problems)


def load_recipe(recipe, *overrides: str, device: str | None = None, registry=None, **settings):
    """A validated `Recipe` (synfer.engine.recipe) from a path, mapping or Recipe, with settings applied.

    Raises `RecipeError` listing every problem (its `.problems` is the list); `validate` returns them instead.
    """
    return _resolve(Recipe, recipe, overrides, settings, device, registry)


def validate(recipe, *overrides: str, device: str | None = None, registry=None, **settings) -> list[str]:
    """Every problem `synfer validate` would report, as a list of lines (empty: the recipe would run). No weights load."""
    try:
        r = load_recipe(recipe, *overrides, device=device, registry=registry, **settings)
    except RecipeError as exc:
        return list(exc.problems)
    out = Path(r.output)
    try:  # a rerun into this output that would stop says so now, as `synfer validate` does
        check_resume(r, out, collect_rows(out) if out.is_dir() else [], registry=registry, write=False)
    except ResumeMismatch as exc:
        return [str(exc)]
    return []


# ---------------------------------------------------------------- jobs


def run(recipe, *overrides: str, device: str | None = None, limit: int | None = None, force: bool = False,
        progress: bool = True, registry=None, **settings) -> "Dataset":
    """`synfer run`: generate, label, write, evaluate; returns the output folder as a `Dataset`.

    `limit` generates only the first N samples; `force` resumes into an output another recipe started.
    The run's summary (counts, metrics) is `Dataset.summary`.
    """
    r = load_recipe(recipe, *overrides, device=device, registry=registry, **settings)
    configure(r.threads)  # as the CLI does, before any torch work
    summary = run_recipe(r, limit=limit, registry=registry, progress=progress, force=force, finish=write_report)
    data = open_dataset(r.output, label_space=r.label_space)
    data.summary = summary
    return data


def stage(kind: str, name: str, *, device: str | None = None, registry=None, **config):
    """One stage built from its plugin for direct use, e.g. `stage("expert", "tiny-cnn").predict(pil_images)` or
    `stage("generator", "sd", steps=10).generate(plan(recipe, 4))`. `kind` is a stage kind (`synfer plugins`);
    `expert` also finds guidance classifiers. Weights load on first use."""
    reg = registry or get_registry()
    if device is not None:
        config["device"] = device
    return reg.build(kind, {"plugin": name, **config})


def plan(recipe, n: int | None = None, *overrides: str, registry=None, **settings) -> list:
    """The first `n` `SampleRequest`s of a recipe (seed, expression, AUs from the FAU-FE prior, the prompter's
    prompt): what `run` hands its generator, for `stage("generator", ...).generate(requests)`."""
    r = load_recipe(recipe, *overrides, registry=registry, **settings)
    requests = make_plan(r, limit=n)
    block = dict(r.prompter)
    prompter = stage("prompter", block.pop("plugin"), registry=registry, **block)
    for req, prompt in zip(requests, prompter.prompt(requests) if requests else []):
        req.prompt = prompt
    return requests


def label(photos, recipe, *overrides: str, device: str | None = None, progress: bool = True, registry=None, **settings) -> "Dataset":
    """`synfer label`: the recipe's experts vote on the faces in `photos` (a folder, or a list of PIL images or
    paths), an `au_detector` annotates AUs; written to the recipe's `output` and returned as a `Dataset`.
    A generation recipe works too (its experts, label space and vote; its generation keys are ignored)."""
    r = _resolve(LabelRecipe, recipe, overrides, settings, device, registry,
                 drop=set(Recipe.model_fields) - set(LabelRecipe.model_fields))
    if isinstance(photos, (str, os.PathLike)):
        label_folder(photos, r, registry=registry, progress=progress)
    else:
        with tempfile.TemporaryDirectory(prefix="synfer-label-") as tmp:
            for i, photo in enumerate(photos):
                if isinstance(photo, (str, os.PathLike)):
                    shutil.copy(photo, Path(tmp) / f"{i:06d}{Path(photo).suffix.lower()}")
                else:
                    photo.save(Path(tmp) / f"{i:06d}.png")
            label_folder(tmp, r, registry=registry, progress=progress)
    return open_dataset(r.output, label_space=r.label_space)


# ---------------------------------------------------------------- datasets


def open_dataset(folder: str | os.PathLike, label_space: str | None = None) -> "Dataset":
    """A synfer dataset folder (a run's output, a FEText set, `synfer label` output) as a `Dataset`."""
    return Dataset(folder, label_space)


class Dataset:
    """A dataset folder: `rows` (metadata.jsonl), `image(i)`, `images()`, `kept()`, `to_datasets()`.

    `label_space` is the recipe's (recipe.json) for a run; for a labelled set it is the space whose
    indices match its rows' `label`/`expression` pairs (affectnet8 first), or as given.
    """

    def __init__(self, folder: str | os.PathLike, label_space: str | None = None):
        self.folder = Path(folder)
        self.rows: list[dict] = read_metadata(self.folder)
        self.label_space = label_space or self._label_space()
        self.summary = None  # the RunSummary when `run` made it

    def _label_space(self) -> str:
        recipe = self.folder / "recipe.json"
        if recipe.is_file():
            return json.loads(recipe.read_text()).get("label_space", "affectnet8")
        pairs = {(r["label"], L.canonical(r["expression"])) for r in self.rows
                 if isinstance(r.get("label"), int) and not isinstance(r.get("label"), bool) and r.get("expression")}
        names = {L.canonical(n) for r in self.rows for n in (r.get("label"), r.get("expression")) if isinstance(n, str) and n}
        for name, classes in L.LABEL_SPACES.items():
            if all(i < len(classes) and classes[i] == e for i, e in pairs) and names <= set(classes):
                return name
        return "affectnet8"

    @property
    def label_names(self) -> list[str]:
        return list(L.label_space(self.label_space))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def __repr__(self) -> str:
        return f"Dataset({str(self.folder)!r}, {len(self)} rows, {sum(self.kept_mask())} kept, label_space={self.label_space!r})"

    def label(self, i: int) -> str | None:
        """Row i's class name (a run's final label, a labelled set's expression)."""
        return row_label(self.rows[i])

    def kept_mask(self) -> list[bool]:
        return [bool(r.get("kept", True)) for r in self.rows]

    def kept(self) -> list[dict]:
        """The rows the vote kept (every row of a labelled set)."""
        return [r for r, k in zip(self.rows, self.kept_mask()) if k]

    def image(self, i: int):
        """Row i's image, RGB (PIL)."""
        return open_rgb(self.folder / self.rows[i]["file_name"])

    def images(self, rows: list[dict] | None = None) -> Iterator:
        """The images of `rows` (default: all), RGB (PIL), one at a time."""
        for r in self.rows if rows is None else rows:
            yield open_rgb(self.folder / r["file_name"])

    @property
    def card(self) -> str | None:
        """The dataset card (README.md) a run wrote, or None."""
        path = self.folder / "README.md"
        return path.read_text() if path.is_file() else None

    @property
    def provenance(self) -> dict | None:
        """provenance.json: recipe hash, models with their weights' sha256 and licences, source faces' terms."""
        path = self.folder / "provenance.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def to_datasets(self, label_space: str | None = None):
        """A `datasets.Dataset`: `image` (Image), `label` and `preassigned_label` (ClassLabel over the label space's
        names, the same for a run and a FEText set), `soft_label` (floats), `agreement`, `kept` (bool), one float
        column per AU (`AU1`, ...), `predictions` (each voter's probabilities), and the text columns present
        (`prompt`, `caption`, `source`). Kept rows: `ds.filter(lambda kept: kept, input_columns="kept")`."""
        import datasets as hf  # optional

        names = list(L.label_space(label_space or self.label_space))

        def index(name: str | None, row: dict) -> int | None:
            if name is None:
                return None
            name = L.canonical(name)
            if name not in names:
                raise DatasetError(f"{self.folder}: row {row.get('file_name')!r} is labelled {name!r}, which is not in label space "
                                   f"{label_space or self.label_space} ({', '.join(names)}); pass label_space=... with that class")
            return names.index(name)

        rows = self.rows
        voters = sorted({k for r in rows for k in (r.get("predictions") or {})})
        cols: dict[str, list] = {
            "image": [str(self.folder / r["file_name"]) for r in rows],
            "label": [index(row_label(r), r) for r in rows],
            "preassigned_label": [index(r.get("preassigned_label"), r) for r in rows],
            "soft_label": [r.get("soft_label") for r in rows],
            "agreement": [r.get("agreement") for r in rows],
            "kept": [bool(r.get("kept", True)) for r in rows],
        }
        feats = {"image": hf.Image(), "label": hf.ClassLabel(names=names), "preassigned_label": hf.ClassLabel(names=names),
                 "soft_label": hf.Sequence(hf.Value("float32")), "agreement": hf.Value("float32"), "kept": hf.Value("bool")}
        for au in L.AU_KEYS:
            cols[au] = [(r.get("aus") or {}).get(au) for r in rows]
            feats[au] = hf.Value("float32")
        if voters:
            cols["predictions"] = [{v: (r.get("predictions") or {}).get(v) for v in voters} for r in rows]
            feats["predictions"] = {v: hf.Sequence(hf.Value("float32")) for v in voters}
        for key, dtype in (("index", "int64"), ("seed", "int64"), ("prompt", "string"), ("caption", "string"), ("source", "string")):
            if any(key in r for r in rows):
                cols[key] = [r.get(key) for r in rows]
                feats[key] = hf.Value(dtype)
        return hf.Dataset.from_dict(cols, features=hf.Features(feats))
