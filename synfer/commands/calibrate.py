"""`synfer calibrate DATASET RECIPE`: run FERAnno + the experts' vote on an existing dataset.

The recipe's calibrator/experts/vote blocks are used (its generator block too, since FERAnno
reads the generator's UNet). Metadata is rewritten atomically under the folder's writer lock;
images are untouched. Rows stream through in batches (read, voted, written to the temp file), so a
million-row dataset is relabelled holding one batch.
"""
from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import click

from synfer.contract import labels as L
from synfer.contract.stages import GeneratedSample, SampleRequest
from synfer.engine.dataset import METADATA, atomic_write, iter_metadata, open_rgb, row_label, write_json
from synfer.engine.lock import OutputLock
from synfer.engine.pipeline import RunSummary, Stages, calibration_counts, label_batch
from synfer.engine.recipe import RecipeError, load_recipe


def calibrate_dataset(dataset: str | Path, recipe, registry=None, batch_size: int = 32, progress: bool = True):
    """Relabel DATASET, holding its writer lock as `synfer run` does (synfer.engine.lock): a run still writing there, or a
    second calibrate, stops this one with a message naming the holder instead of interleaving metadata rewrites."""
    with OutputLock(dataset, "synfer calibrate", rank=0):
        return _calibrate(Path(dataset), recipe, registry, batch_size, progress)


def _calibrate(root: Path, recipe, registry, batch_size: int, progress: bool):
    from tqdm.auto import tqdm  # heavy

    rows = iter_metadata(root)
    first = list(islice(rows, batch_size))  # the whole file is checked here, before any model loads
    stages = Stages(recipe, registry)
    classes = L.label_space(recipe.label_space)
    counts: dict[str, Counter] = {}

    def relabel(f):
        chunk = first
        with tqdm(desc="calibrate", unit="img", disable=not progress) as bar:
            while chunk:
                samples = []
                for r in chunk:
                    req = SampleRequest(index=r["index"], seed=r.get("seed", 0), expression=L.canonical(r.get("preassigned_label") or row_label(r)),
                                        aus=r.get("aus") or {}, prompt=r.get("prompt", ""), layout_source=r.get("layout_source"))
                    samples.append(GeneratedSample(request=req, image=open_rgb(root / r["file_name"])))
                out_rows = []
                for r, ls in zip(chunk, label_batch(stages, samples, classes)):
                    new = ls.metadata(r["file_name"])
                    out_rows.append({**r, **{k: new[k] for k in ("preassigned_label", "label", "soft_label", "agreement", "kept", "predictions")}})
                f.write("".join(json.dumps(r) + "\n" for r in out_rows).encode("utf-8"))
                for k, c in calibration_counts(out_rows).items():
                    counts.setdefault(k, Counter()).update(c)
                bar.update(len(chunk))
                chunk = list(islice(rows, batch_size))

    atomic_write(root / METADATA, relabel)
    counts = dict(sorted(counts.items()))
    write_json(root / "calibration.json", {k: dict(v) for k, v in counts.items()})
    return counts


@click.command("calibrate")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--batch-size", default=32, show_default=True)
def calibrate_cli(dataset, recipe, overrides, batch_size):
    """Relabel an existing DATASET with the calibrator and experts of RECIPE."""
    try:
        r = load_recipe(recipe, overrides)
    except RecipeError as exc:
        raise click.ClickException(str(exc))
    counts = calibrate_dataset(dataset, r, batch_size=batch_size)
    n = sum(c["total"] for c in counts.values())
    click.echo(RunSummary(dataset, n, 0, n, 0.0, counts).table())
