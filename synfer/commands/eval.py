"""`synfer eval DATASET`: run evaluator plugins, print, merge into metrics.json with each metric's provenance.

    synfer eval out/quickstart                      # the evaluators the run itself used (its recipe.json)
    synfer eval out/quickstart --reference data/fetext-test
    synfer eval out/quickstart --evaluators fer-accuracy,label-quality -o fer-accuracy.judge=tiny-cnn

What metrics.json holds: synfer.engine.evaluate.
"""
from __future__ import annotations

from pathlib import Path

import click

from synfer.contract.contracts import PluginError
from synfer.engine.evaluate import DEFAULT_EVALUATORS, METRICS, evaluate_dataset, run_evaluator_blocks


@click.command("eval")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--reference", type=click.Path(exists=True, file_okay=False), default=None,
              help="Real dataset folder for FID (wins over the evaluator's own `reference`).")
@click.option("--evaluators", default=None,
              help=f"Comma-separated plugin names (default: the run's own evaluators from its recipe.json, else {','.join(DEFAULT_EVALUATORS)}).")
@click.option("--device", default=None, help="Device for judges and feature extractors, e.g. cuda.")
@click.option("-o", "--option", "options", multiple=True, help="Evaluator setting, e.g. fid.max_images=500 or fer-accuracy.judge=tiny-cnn.")
def eval_cli(dataset, reference, evaluators, device, options):
    """Measure DATASET (FID, FER accuracy, AU F1, diversity, label quality); merges into DATASET/metrics.json."""
    names = [n.strip() for n in evaluators.split(",") if n.strip()] if evaluators else None
    own = names is None and run_evaluator_blocks(dataset) is not None
    if own:
        click.echo(f"note: the evaluators of the run that wrote {dataset} ({Path(dataset) / 'recipe.json'})", err=True)
    elif names is None and reference is None:
        click.echo("note: no --reference, so fid is skipped", err=True)
    try:
        metrics = evaluate_dataset(dataset, reference, names, device, options)
    except (PluginError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc))
    click.echo(f"\n{len(metrics)} metric(s) -> {Path(dataset) / METRICS}")
    for k in sorted(metrics):
        click.echo(f"  {k:<34} " + ("null" if metrics[k] is None else f"{metrics[k]:.4f}"))
