"""`synfer benchmark downstream | merge | ssl RECIPE`: does the synthetic set help a FER model on real faces?
(paper 5.2, Fig. 6; Table 2 for `ssl`). The benchmarks themselves: synfer.commands.downstream (supervised, and the
recipe both read) and synfer.commands.selfsup (SimCLR + linear probe).
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


def _config(recipe, overrides):
    try:
        return load_config(recipe, overrides)
    except RecipeError as exc:
        raise click.ClickException(str(exc))


def _show(result: dict, out: Path, name: str) -> None:
    click.echo(table(result))
    click.echo(f"-> {out / (name + '.json')}, {out / (name + '.png')}")


@benchmark_cli.command("downstream")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
def downstream(recipe, overrides):
    """Train the same small FER model on real / synthetic / real+synthetic data; test on real.

    OVERRIDES are key=value pairs, e.g. seeds=[0] iters=50 synthetic=out/quickstart
    """
    cfg = _config(recipe, overrides)
    n = training_count(cfg.seeds, cfg.settings, cfg.scales, alone="real")
    click.echo(f"downstream: {n} trainings of {cfg.iters} steps at {cfg.size}x{cfg.size}")
    _show(run_downstream(cfg, echo=click.echo), Path(cfg.output or cfg.synthetic), "downstream")


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
    _show(write_result(result, out), out, "downstream")


@benchmark_cli.command("ssl")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
def ssl_command(recipe, overrides):
    """SimCLR pretraining on real / synthetic / both, then a linear probe on the real faces; test on real.

    Same recipe as `downstream` (its `ssl:` block sets the pretraining), e.g. ssl.steps=100 seeds=[0]
    """
    cfg = _config(recipe, overrides)
    s = cfg.ssl
    n = training_count(cfg.seeds, s.settings, s.scales, alone="ssl-real")
    click.echo(f"ssl: {n} SimCLR pretrainings of {s.steps} steps (batch {s.batch_size} x 2 views) at {cfg.size}x{cfg.size} + linear probes")
    _show(run_ssl(cfg, echo=click.echo), Path(cfg.output or cfg.synthetic), "ssl")
