"""`synfer eval DATASET --reference REAL`: run evaluator plugins, print, merge into metrics.json.

    synfer eval out/quickstart --reference data/fetext-test
    synfer eval out/quickstart --evaluators fer-accuracy,label-quality -o fer-accuracy.judge=tiny-cnn
"""
from __future__ import annotations

import json
from pathlib import Path

import click

DEFAULT_EVALUATORS = ("fid", "fer-accuracy", "au-accuracy", "diversity", "label-quality")
METRICS = "metrics.json"


def merge_metrics(dataset: str | Path, metrics: dict[str, float]) -> Path:
    """Write `metrics` into DATASET/metrics.json, keeping keys already there that were not recomputed."""
    path = Path(dataset) / METRICS
    from synfer.dataset import write_json

    old = json.loads(path.read_text()) if path.exists() else {}
    return write_json(path, {**old, **metrics}, sort_keys=True)


def evaluate_dataset(dataset: str | Path, reference: str | Path | None = None, evaluators=None, device: str | None = None,
                     options=(), registry=None, write: bool = True) -> dict[str, float]:
    """Build each named evaluator (with `options` like `fid.max_images=500`), run it, merge the results."""
    from synfer.plugins import get_registry
    from synfer.recipe import apply_overrides

    reg = registry or get_registry()
    names = list(evaluators or [n for n in DEFAULT_EVALUATORS if n != "fid" or reference is not None])
    blocks = apply_overrides({n: {} for n in names}, list(options))
    unknown = set(blocks) - set(names)
    if unknown:
        raise click.UsageError(f"options for {sorted(unknown)}, which are not among the evaluators run ({', '.join(names)})")
    built = []
    for n in names:  # build all first: a typo fails before anything slow runs
        cls = reg.get("evaluator", n)
        block = {"plugin": n, **blocks[n]}
        if device and "device" in cls.Config.model_fields and "device" not in block:
            block["device"] = device
        built.append(reg.build("evaluator", block))
    metrics: dict[str, float] = {}
    for ev in built:
        metrics.update(ev.evaluate(Path(dataset), Path(reference) if reference else None))
    if write:
        merge_metrics(dataset, metrics)
    return metrics


@click.command("eval")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--reference", type=click.Path(exists=True, file_okay=False), default=None,
              help="Real dataset folder for FID (without it, fid is skipped unless named).")
@click.option("--evaluators", default=None, help=f"Comma-separated plugin names (default: {','.join(DEFAULT_EVALUATORS)}).")
@click.option("--device", default=None, help="Device for judges and feature extractors, e.g. cuda.")
@click.option("-o", "--option", "options", multiple=True, help="Evaluator setting, e.g. fid.max_images=500 or fer-accuracy.judge=tiny-cnn.")
def eval_cli(dataset, reference, evaluators, device, options):
    """Measure DATASET: FID, FER accuracy, AU F1, diversity, label quality; merges into DATASET/metrics.json."""
    from synfer.plugins import PluginError

    names = [n.strip() for n in evaluators.split(",") if n.strip()] if evaluators else None
    if names is None and reference is None:
        click.echo("note: no --reference, so fid is skipped", err=True)
    try:
        metrics = evaluate_dataset(dataset, reference, names, device, options)
    except (PluginError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc))
    click.echo(f"\n{len(metrics)} metric(s) -> {Path(dataset) / METRICS}")
    for k in sorted(metrics):
        click.echo(f"  {k:<34} {metrics[k]:.4f}")
