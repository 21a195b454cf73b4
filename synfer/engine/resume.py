"""A resume that knows its recipe: `<output>/recipe.json` holds the resolved recipe of the run
that started the folder, and a rerun that would draw different samples stops.

Resume skips sample indices already on disk, so rerunning into a folder with another seed,
model or label space would silently mix two datasets. `check_resume` compares the keys that
change what is drawn (every key of the resolved recipe, stage blocks with their plugins'
defaults filled in) and names those that differ; `--force` (force=True) continues anyway and
records the new recipe. Keys that only say how many or what else to do (`num_images`,
`evaluators`, `grid`, `report`, `threads`, batch sizes) never block: growing a run is a resume too.
The output path itself is not stored (a moved folder still resumes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from synfer.engine.dataset import write_json
from synfer.engine.recipe import expert_kind, expert_member
from synfer.engine.registry import get_registry

RECIPE_FILE = "recipe.json"
# Top-level keys that do not change any sample's pixels or labels.
FREE_KEYS = ("num_images", "output", "evaluators", "grid", "report", "threads")
# Leaf names that change speed or memory only (the output does not depend on the batch size).
FREE_LEAVES = ("batch_size",)


# A plugin Config marks a field that changes speed or logging but not the samples (a device
# thread count, a progress delay) with `Field(..., json_schema_extra=NOT_SAMPLES)`; it is left
# out of recipe.json and never blocks a resume.
NOT_SAMPLES = {"affects_samples": False}


class ResumeMismatch(ValueError):
    """A rerun into an output written by a recipe that draws other samples."""


def _resolve_block(registry, kind: str, block: dict[str, Any]) -> dict[str, Any]:
    """A stage block with its plugin's Config defaults filled in (what the run really used)."""
    block = dict(block)
    name = block.pop("plugin")
    cls = registry.get(kind, name)
    free = {k for k, f in cls.Config.model_fields.items() if isinstance(f.json_schema_extra, dict)
            and f.json_schema_extra.get("affects_samples") is False}
    return {"plugin": name, **cls.Config(**block).model_dump(mode="json", exclude=free)}


def resolved_recipe(recipe, registry=None) -> dict[str, Any]:
    """The recipe as run: every field, stage blocks with their defaults; no output path."""
    reg = registry or get_registry()
    data = recipe.model_dump(mode="json", exclude={"output"})
    for key, kind in type(recipe).stage_slots.items():
        if data.get(key):
            data[key] = _resolve_block(reg, kind, data[key])
    # the ensemble's keys (weight, align) are recorded beside the plugin's resolved Config, never passed to it
    data["experts"] = [{"weight": float(b.get("weight", 1.0)), **({"align": b["align"]} if b.get("align") is not None else {}),
                        **_resolve_block(reg, expert_kind(reg, b["plugin"]), expert_member(b))}
                       for b in data.get("experts", [])]
    data["evaluators"] = [_resolve_block(reg, "evaluator", b) for b in data.get("evaluators", [])]
    return data


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = {f"{prefix}.length": len(obj)}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: obj}


def explicit_keys(recipe) -> set[str]:
    """Dotted keys the recipe (file + overrides) sets itself, as opposed to defaults filled in."""
    return set(_flatten(recipe.model_dump(mode="json", exclude_unset=True, exclude={"output"})))


def changed_keys(old: dict[str, Any], new: dict[str, Any], explicit: set[str] | None = None) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every sample-changing key that differs. With `explicit`
    (the keys the new recipe sets itself), a key the old recipe.json lacks and the new recipe leaves
    at its default is a setting added by a later synfer, at the value that keeps the old behaviour:
    not a change (a folder started before `generator.scheduler` existed still resumes)."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in FREE_KEYS or key.split(".")[-1] in FREE_LEAVES:
            continue
        if explicit is not None and key not in a and key not in explicit:
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append((key, a.get(key, "<unset>"), b.get(key, "<unset>")))
    return out


def check_resume(recipe, out: str | Path, rows: Iterable[dict], force: bool = False, registry=None, write: bool = True) -> None:
    """Before a run writes into `out`: compare with `out/recipe.json` (ResumeMismatch naming the
    keys that differ, unless `force`), refuse a labelled (FEText/real) folder, and record the
    recipe when the folder has none (or `force` replaced it). `write=False` for torchrun ranks > 0.
    `rows` (the rows on disk, e.g. `synfer.engine.dataset.iter_rows`) is read only when there is no recipe.json,
    and only until a generated row shows up."""
    out = Path(out)
    path = out / RECIPE_FILE
    new = resolved_recipe(recipe, registry)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old is not None and old == new:
            return
        diff = changed_keys(old, new, explicit_keys(recipe)) if old is not None else [("recipe.json", "unreadable", "this recipe")]
        if diff and not force:
            shown = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, a, b in diff[:8])
            more = f" and {len(diff) - 8} more" if len(diff) > 8 else ""
            raise ResumeMismatch(
                f"{out} was started by a recipe that draws other samples: {shown}{more} differ from {path}. "
                "Resuming would mix two datasets. Write to another output=..., put the keys back, "
                "or rerun with --force to continue with the new recipe.")
    elif not force and (labelled := _labelled(rows)):
        raise ResumeMismatch(
            f"{out} holds {labelled} labelled images (a FEText or real set), not the output of 'synfer run'; "
            "pick another output=... for the run (a FEText folder is an input: layout source, FID reference, training data).")
    if write:
        write_json(path, new, sort_keys=True)


def _labelled(rows: Iterable[dict]) -> int:
    """How many rows, when none is a generated row (none has a preassigned label); 0 as soon as one is."""
    n = 0
    for r in rows:
        if "preassigned_label" in r:
            return 0
        n += 1
    return n


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
