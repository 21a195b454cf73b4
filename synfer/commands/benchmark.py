"""`synfer benchmark downstream RECIPE`: does the synthetic set help a FER model on real faces? (paper 5.2, Fig. 6)

The same small FER classifier (`classifier:`, a registered guidance classifier that is also a
synfer.contract.stages.TrainableClassifier; default the built-in tiny-cnn) is trained on
(a) real only, (b) synthetic only and (c) real + synthetic, with the synthetic set at
several multiples of the real set's size, for several seeds, and tested on a held-out real
set (and, when `real_test_2` names one, on a second held-out split built with another seed:
every trained model is scored on both, and no setting was chosen on the second). Every
training gets the same number of steps, so a setting wins by its data, not by a longer
schedule. `real_per_class` picks the regime (50: data-scarce; 250: data-rich). Writes
`downstream.json` and `downstream.png` (accuracy and UAR vs synthetic scale, a line per
setting, a band for real only) and prints a table. `synfer benchmark ssl` (synfer.commands.selfsup)
adds the self-supervised paradigm in the same format. The benchmark itself: synfer.commands.downstream.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from synfer.commands.downstream import load_config, merge_results, run_downstream, table, training_count, write_result
from synfer.commands.selfsup import run_ssl
from synfer.engine.recipe import RecipeError


@click.group("benchmark")
def benchmark_cli():
    """Benchmarks of a synthetic dataset's usefulness (paper 5.2)."""


@benchmark_cli.command("downstream")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
def downstream(recipe, overrides):
    """Train the same small FER model on real / synthetic / real+synthetic data; test on real.

    OVERRIDES are key=value pairs, e.g. seeds=[0] iters=50 synthetic=out/quickstart
    """
    try:
        cfg = load_config(recipe, overrides)
    except RecipeError as exc:
        raise click.ClickException(str(exc))
    n = training_count(cfg.seeds, cfg.settings, cfg.scales, alone="real")
    click.echo(f"downstream: {n} trainings of {cfg.iters} steps at {cfg.size}x{cfg.size}")
    result = run_downstream(cfg, echo=click.echo)
    click.echo(table(result))
    out = Path(cfg.output or cfg.synthetic)
    click.echo(f"-> {out / 'downstream.json'}, {out / 'downstream.png'}")

@benchmark_cli.command("merge")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="folder for the merged downstream.json/png")
def merge_cmd(results, output):
    """Merge downstream.json files of one recipe run in parts (different settings or scales)."""
    try:
        result = merge_results([json.loads(Path(p).read_text()) for p in results])
    except ValueError as exc:
        raise click.ClickException(str(exc))
    out = Path(output)
    result["config"]["output"] = str(out)
    click.echo(table(write_result(result, out)))
    click.echo(f"-> {out / 'downstream.json'}, {out / 'downstream.png'}")

@benchmark_cli.command("ssl")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
def ssl_command(recipe, overrides):
    """SimCLR pretraining on real / synthetic / both, then a linear probe on the real faces; test on real.

    Same recipe as `downstream` (its `ssl:` block sets the pretraining), e.g. ssl.steps=100 seeds=[0]
    """
    try:
        cfg = load_config(recipe, overrides)
    except RecipeError as exc:
        raise click.ClickException(str(exc))
    s = cfg.ssl
    n = training_count(cfg.seeds, s.settings, s.scales, alone="ssl-real")
    click.echo(f"ssl: {n} SimCLR pretrainings of {s.steps} steps (batch {s.batch_size} x 2 views) at {cfg.size}x{cfg.size} + linear probes")
    result = run_ssl(cfg, echo=click.echo)
    click.echo(table(result))
    out = Path(cfg.output or cfg.synthetic)
    click.echo(f"-> {out / 'ssl.json'}, {out / 'ssl.png'}")
