"""The `synfer` command line. No torch at import time: `--help`, `plugins` and `validate` stay fast."""
from __future__ import annotations

import importlib
import json
import os
import sys

import click

# Subcommand groups living in their own modules, loaded when used (module:attribute).
LAZY_COMMANDS = {
    "fetext": "synfer.fetext:fetext_cli",
    "train": "synfer.training:train_cli",
    "models": "synfer.fetch:models_cli",
    "eval": "synfer.evaluate:eval_cli",
    "benchmark": "synfer.benchmark:benchmark_cli",
    "report": "synfer.report:report_cli",
    "calibrate": "synfer.calibrate:calibrate_cli",
    "bootstrap": "synfer.bootstrap:bootstrap_cli",
    "plugin": "synfer.scaffold:plugin_cli",
    "recipe": "synfer.recipedocs:recipe_cli",
    "label": "synfer.label:label_cli",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                return click.Command(name, help=f"(unavailable: {exc})", callback=lambda: sys.exit(f"synfer {name} is unavailable: {exc}"))
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="synfer")
@click.option("-v", "--verbose", is_flag=True, help="Show the full traceback of an error (and more log output).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes; errors only.")
def main(verbose, quiet):
    """synfer: synthesize facial-expression datasets with diffusion models (SynFER)."""
    from synfer.logs import setup

    setup(1 if verbose else -1 if quiet else 0)  # quiet third-party logs and warnings unless -v (synfer/logs.py)


def _load_recipe(path, overrides):
    from synfer.recipe import RecipeError, load_recipe

    try:
        return load_recipe(path, overrides)
    except RecipeError as exc:
        raise click.ClickException(str(exc))


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--limit", type=int, default=None, help="Generate only the first N samples (a quick look).")
@click.option("--force", is_flag=True, help="Resume into an output written by a recipe that draws other samples (see recipe.json).")
def run(recipe, overrides, limit, force):
    """Run a recipe: plan -> generate -> calibrate -> write -> evaluate.

    OVERRIDES are key=value pairs, e.g. generator.steps=10 num_images=16 output=out/x
    """
    r = _load_recipe(recipe, overrides)
    from synfer.pipeline import run_recipe

    from synfer.resume import ResumeMismatch

    try:
        summary = run_recipe(r, limit=limit, force=force)
    except ResumeMismatch as exc:
        raise click.ClickException(str(exc))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 has the merged summary
        click.echo(summary.table())


@main.command("merge")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
def merge_cmd(dataset):
    """Fold the per-rank metadata parts of a torchrun DATASET into metadata.jsonl.

    `synfer run` under torchrun does this itself on rank 0; use this when ranks died, or to
    inspect a dataset while a distributed run is still going (rerunning the run also merges).
    """
    from synfer.dataset import merge

    rows = merge(dataset)
    click.echo(f"{dataset}: {len(rows)} samples in metadata.jsonl")


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
def validate(recipe, overrides):
    """Check a recipe without loading any weights; lists every problem at once."""
    r = _load_recipe(recipe, overrides)
    from pathlib import Path

    from synfer.resume import ResumeMismatch, check_resume

    if Path(r.output).is_dir():  # a rerun into this output would stop: say so now
        from synfer.dataset import collect_rows

        try:
            check_resume(r, r.output, collect_rows(Path(r.output)), write=False)
        except ResumeMismatch as exc:
            raise click.ClickException(f"{recipe}: {exc}")
    click.echo(f"{recipe}: ok ({r.num_images} images -> {r.output})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json):
    """List installed plugins: name, stage, provider package, version."""
    from synfer.plugins import get_registry

    reg = get_registry()
    rows = [{"name": p.name, "stage": p.kind, "provider": p.provider, "version": p.version}
            for p in sorted(reg.plugins.values(), key=lambda p: (p.kind, p.name))]
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failed": [{"entry_point": n, "error": m} for n, m in reg.failures]}, indent=2))
        return
    for r in rows:
        click.echo(f"{r['stage']:<20} {r['name']:<22} {r['provider']} {r['version']}")
    # failures were already warned about, once each, while the registry loaded (synfer/logs.py)


@main.command()
def labels():
    """Show the label spaces, the AU set and the FAU-FE prior."""
    from synfer import labels as L

    click.echo("Label spaces:")
    for name, classes in L.LABEL_SPACES.items():
        click.echo(f"  {name:<11} {', '.join(classes)}")
    click.echo(f"\nAction units (scale: {L.AU_SCALE}):")
    for au, desc in L.AU_NAMES.items():
        click.echo(f"  AU{au:<3} {desc}")
    click.echo("\nFAU-FE prior (EMFACS prototypes):")
    for expr, aus in L.FAU_FE_PRIOR.items():
        click.echo(f"  {expr:<9} {', '.join(f'AU{a}' for a in aus) or '(none)'}")


if __name__ == "__main__":  # pragma: no cover
    main()
