"""`synfer label FOLDER --recipe R`: expression labels and AUs for a folder of real photos.

Each photo goes through the recipe's `face_detector` (its largest face), is aligned to a square
crop (synfer.engine.align), and the recipe's experts vote on the crop as in paper 4.1, with no
preassigned label: the soft label is the weighted average of the experts' probabilities (each
mapped into the recipe's label space; a class an expert cannot see gets no vote from it), the
label its argmax, `agreement` the weighted share of experts whose own argmax is that label, and
`kept` says whether the average reached `vote.threshold`. An `au_detector` annotates AUs. The
output is a synfer dataset (images/ + metadata.jsonl), so real in-the-wild faces get labels
and AUs for FEText. Photos without a face are listed in `skipped.txt`.

Every stage is built through the plugin registry: no plugin is imported here. A generation
recipe works too: its experts, label space and vote are used, its generation keys ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import click
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from synfer.contract import labels as L
from synfer.contract.contracts import calling
from synfer.contract.stages import FaceRecord
from synfer.engine.dataset import DatasetWriter, merge
from synfer.engine.ensemble import _agreement, _mixture
from synfer.engine.recipe import Recipe, RecipeError, RecipeModel, VoteConfig, expert_kind, expert_member, read_yaml, validate_recipe
from synfer.engine.registry import get_registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AlignConfig(_Strict):
    size: int = Field(224, ge=32)  # side of the square crop written to the dataset and shown to the experts
    zoom: float = Field(1.0, gt=0, le=2)  # 1: brows to lower lip (FER2013-like); smaller shows more of the head


class LabelRecipe(RecipeModel):
    """What `synfer label` reads: a detector, the crop, the experts and their vote, an AU detector."""

    stage_slots: ClassVar[dict[str, str]] = {"face_detector": "face_detector", "au_detector": "au_detector"}
    stage_lists: ClassVar[dict[str, str]] = {"experts": "expert"}

    label_space: str = "affectnet8"
    output: str = "out/labelled"
    face_detector: dict[str, Any] = {"plugin": "retinaface"}
    align: AlignConfig = AlignConfig()
    au_detector: dict[str, Any] | None = {"plugin": "landmarks"}  # None: no AUs
    experts: list[dict[str, Any]] = Field(min_length=1)  # as in a generation recipe ({plugin, weight, ...}); crops are aligned already
    vote: VoteConfig = VoteConfig()
    batch_size: int = Field(8, gt=0)

    @field_validator("label_space")
    @classmethod
    def _space(cls, v):
        L.label_space(v)
        return v

    @classmethod
    def item_problems(cls, key, i, block, registry):
        return Recipe.item_problems(key, i, block, registry)  # the same expert blocks (weight, align) as `synfer run`


def load_label_recipe(path: str | Path, overrides=(), registry=None) -> LabelRecipe:
    """A label recipe (or the labelling part of a generation recipe), every problem reported at once."""
    problems: list[str] = []
    data = read_yaml(path, overrides, problems)
    ignored = set(Recipe.model_fields) - set(LabelRecipe.model_fields)  # generation keys: known, not typos
    data = {k: v for k, v in data.items() if k not in ignored}
    return validate_recipe(LabelRecipe, data, registry, str(path), problems)


def photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def vote(probs, sees, weights, threshold: float) -> tuple[int, Any, float, bool]:
    """(label, soft label, agreement, kept) from (M, C) mapped expert probabilities, no prior label."""
    soft = _mixture(probs, sees, weights)
    label = int(soft.argmax())
    return label, soft, _agreement(probs, sees, weights, label), bool(soft[label] >= threshold)


def label_folder(folder: str | Path, recipe: LabelRecipe, registry=None, progress: bool = True) -> list[dict]:
    """Detect, align, vote and annotate every photo under `folder`; write the dataset; return its rows."""
    from PIL import Image  # heavy
    from tqdm.auto import tqdm  # heavy

    reg = registry or get_registry()
    folder = Path(folder)
    detector = reg.build("face_detector", recipe.face_detector)
    au_detector = reg.build("au_detector", recipe.au_detector) if recipe.au_detector else None
    experts, names, weights = [], [], []
    for block in recipe.experts:
        weight = float(block.get("weight", 1.0))
        block = expert_member(block)
        e = reg.build(expert_kind(reg, block["plugin"]), block)
        name = e.name if e.name not in names else f"{e.name}#{names.count(e.name) + 1}"
        experts.append(e)
        names.append(name)
        weights.append(weight)
    classes = L.label_space(recipe.label_space)
    sees = np.stack([L.mapping_matrix(e.label_space, recipe.label_space).sum(0) > 0 for e in experts]).astype(float)
    weights = np.asarray(weights, dtype=float)
    out = Path(recipe.output)
    writer = DatasetWriter(out)
    files = photos(folder)
    done = {r.get("source_file"): r["index"] for r in writer.rows}
    moved = [str(p.relative_to(folder)) for i, p in enumerate(files) if i in writer.done and done.get(str(p.relative_to(folder))) != i]
    if moved:  # indices are positions in the sorted file list: a changed folder would mix photos up
        raise click.ClickException(f"{out} was labelled from a different file list (e.g. {moved[0]} is now photo {files.index(folder / moved[0])}); "
                                   f"label into a new output, or restore the folder as it was")
    todo = [(i, p) for i, p in enumerate(files) if i not in writer.done]
    skipped = []
    for start in tqdm(range(0, len(todo), recipe.batch_size), desc="label", disable=not progress):
        batch = todo[start:start + recipe.batch_size]
        images, found = [], []
        for i, path in batch:
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except (OSError, ValueError) as exc:
                skipped.append(f"{path.relative_to(folder)} (unreadable: {exc})")
                continue
            found.append((i, path))
        faces = detector.detect(images)
        items = []
        for (i, path), image, fs in zip(found, images, faces):
            if not fs:
                skipped.append(f"{path.relative_to(folder)} (no face found by {detector.name}{NO_FACE_HINT})")
                continue
            face = max(fs, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
            items.append((i, path, face, detector.align(image, face, recipe.align.size, recipe.align.zoom)))
        if not items:
            continue
        crops = [c for *_, c in items]
        mapped = np.stack([L.convert_probs(_predict(e, crops), e.label_space, recipe.label_space) for e in experts], 1)
        aus = au_detector.detect([FaceRecord(image=c, expression=None, source="label") for c in crops]) if au_detector else [None] * len(crops)
        rows = []
        for n, (i, path, face, crop) in enumerate(items):
            label, soft, agreement, kept = vote(mapped[n], sees, weights, recipe.vote.threshold)
            rows.append((i, crop, {
                "source_file": str(path.relative_to(folder)), "label": classes[label], "expression": classes[label],
                "soft_label": [round(float(p), 5) for p in soft], "agreement": round(agreement, 5), "kept": kept,
                "preassigned_label": None, "aus": aus[n],
                "predictions": {nm: [round(float(p), 5) for p in mapped[n, j]] for j, nm in enumerate(names)},
                "face": {"box": [round(v, 1) for v in face.box], "score": round(face.score, 4),
                         "landmarks": None if face.landmarks is None else [[round(a, 1), round(b, 1)] for a, b in face.landmarks]},
            }))
        writer.write_many(rows)
    rows = merge(out)
    (out / "skipped.txt").write_text("".join(s + "\n" for s in skipped))
    return rows


def _predict(expert, crops):
    """An expert's probabilities on its own copies of the crops (a plugin that edits them changes nothing written),
    its errors naming it."""
    with calling(expert, "predict"):
        return expert.predict([c.copy() for c in crops])


NO_FACE_HINT = "; photos that are already face crops: face_detector.plugin=whole-image"


@click.command("label")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--recipe", "recipe_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="A label recipe (recipes/label-photos.yaml) or a generation recipe (its experts vote).")
@click.argument("overrides", nargs=-1)
def label_cli(folder, recipe_path, overrides):
    """Label the faces in FOLDER's photos with the recipe's experts, and annotate their AUs.

    OVERRIDES are key=value pairs, e.g. output=out/my-photos vote.threshold=0.5
    """
    try:
        recipe = load_label_recipe(recipe_path, overrides)
    except RecipeError as exc:
        raise click.ClickException(str(exc))
    rows = label_folder(folder, recipe)
    counts = {c: sum(r["label"] == c for r in rows) for c in L.label_space(recipe.label_space)}
    click.echo(f"{recipe.output}: {len(rows)} faces labelled from {len(photos(Path(folder)))} photos "
               f"(see {Path(recipe.output) / 'skipped.txt'} for the rest)")
    click.echo("  " + ", ".join(f"{c} {n}" for c, n in counts.items() if n))
    skipped = (Path(recipe.output) / "skipped.txt").read_text().splitlines()
    no_face = sum(NO_FACE_HINT in line for line in skipped)
    if no_face and no_face >= len(rows):  # most photos without a face: they are likely crops already
        click.echo(f"note: no face found in {no_face} photo(s). If they are face crops already, rerun with "
                   "face_detector.plugin=whole-image (each photo is then the face)", err=True)
    unmeasured = sum(1 for r in rows if recipe.au_detector and r.get("aus") is None)
    if unmeasured:
        click.echo(f"warning: the au_detector measured no AUs on {unmeasured} of {len(rows)} face(s): their `aus` are null", err=True)
