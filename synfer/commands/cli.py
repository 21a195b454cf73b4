"""The `synfer` command line. No torch at import time: `--help`, `plugins` and `validate` stay fast."""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import click

from synfer.commands.report import write_report
from synfer.contract import labels as L
from synfer.engine.dataset import DatasetError, iter_rows, merge, read_metadata
from synfer.engine.errors import explain
from synfer.engine.logs import setup, verbosity
from synfer.engine.pipeline import run_recipe
from synfer.engine.recipe import RecipeError, load_recipe
from synfer.engine.registry import forget_registry, get_registry
from synfer.engine.resume import ResumeMismatch, check_resume
from synfer.engine.threads import configure

# Subcommand groups living in their own modules, loaded when used (module:attribute).
LAZY_COMMANDS = {
    "fetext": "synfer.commands.fetext:fetext_cli",
    "train": "synfer.commands.train:train_cli",
    "models": "synfer.commands.models:models_cli",
    "eval": "synfer.commands.eval:eval_cli",
    "benchmark": "synfer.commands.benchmark:benchmark_cli",
    "report": "synfer.commands.report:report_cli",
    "calibrate": "synfer.commands.calibrate:calibrate_cli",
    "bootstrap": "synfer.commands.bootstrap:bootstrap_cli",
    "plugin": "synfer.commands.scaffold:plugin_cli",
    "recipe": "synfer.commands.recipedocs:recipe_cli",
    "label": "synfer.commands.label:label_cli",
}


class LazyGroup(click.Group):
    """Core commands, lazy command modules, and the commands plugins add (hook `register_commands`)."""

    _plugins_added = False
    lazy = LAZY_COMMANDS  # core command names no plugin may take (synfer.engine.registry.Registry.add_commands)

    def invoke(self, ctx):
        """Every subcommand's one error path: a known failure is one or two lines and exit 1; -v re-raises."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - turned into a message unless -v
            if verbosity() > 0:
                raise

            raise click.ClickException(explain(exc)) from exc

    def add_plugin_commands(self, ctx=None):
        if not self._plugins_added:
            self._plugins_added = True

            if ctx is not None and "verbose" in ctx.params:  # parsed, main() not called yet: plugin warnings print as its own

                setup(1 if ctx.params["verbose"] else -1 if ctx.params["quiet"] else 0)

            get_registry().add_commands(self)

    def subgroup(self, name: str) -> click.Group:
        """The group behind `synfer NAME` (e.g. "train", "fetext"), for a plugin to add subcommands to."""
        cmd = self._lazy(name) if name in LAZY_COMMANDS else super().get_command(None, name)
        if not isinstance(cmd, click.Group):
            raise KeyError(f"synfer has no command group {name!r}; groups: {', '.join(LAZY_COMMANDS)}")
        return cmd

    def list_commands(self, ctx):
        self.add_plugin_commands(ctx)
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name not in self.commands or name in LAZY_COMMANDS:  # core commands need no plugin commands
            self.add_plugin_commands(ctx)
        return self._lazy(name) if name in LAZY_COMMANDS else super().get_command(ctx, name)

    @staticmethod
    def _lazy(name):
        module, attr = LAZY_COMMANDS[name].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            why = f"synfer {name} is unavailable: {exc}"  # `exc` is unbound once the except block ends
            return click.Command(name, help=f"(unavailable: {exc})", callback=lambda: sys.exit(why))


def _select_plugins(ctx, param, values):
    """`-p no:NAME` disables a plugin, `-p NAME` loads only the named third-party plugins (as pytest's -p)."""
    for var, names in (("SYNFER_DISABLE_PLUGINS", [v[3:] for v in values if v.startswith("no:")]),
                       ("SYNFER_PLUGINS", [v for v in values if not v.startswith("no:")])):
        if names:
            os.environ[var] = ",".join(filter(None, [os.environ.get(var, "")] + names))
    if values:
        forget_registry()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="synfer")
@click.option("-p", "plugin_selection", multiple=True, metavar="[no:]NAME", expose_value=False, is_eager=True, callback=_select_plugins,
              help="'-p no:NAME' disables plugin NAME; '-p NAME' loads only the named third-party plugins (built-ins always load).")
@click.option("-v", "--verbose", is_flag=True, help="Show the full traceback of an error (and more log output).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes; errors only.")
def main(verbose, quiet):
    """synfer: synthesize facial-expression datasets with diffusion models (SynFER)."""
    setup(1 if verbose else -1 if quiet else 0)  # quiet third-party logs and warnings unless -v (synfer/logs.py)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it: every progress bar off


def _load_recipe(path, overrides):
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

    configure(r.threads)  # once, before any torch work (synfer/threads.py)

    try:
        summary = run_recipe(r, limit=limit, force=force, finish=write_report)
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
    rows = merge(dataset)
    click.echo(f"{dataset}: {len(rows)} samples in metadata.jsonl")


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
def validate(recipe, overrides):
    """Check a recipe without loading any weights; lists every problem at once."""
    r = _load_recipe(recipe, overrides)


    try:  # the recipe resolved as `run` resolves it; a rerun into this output that would stop says so now
        check_resume(r, r.output, iter_rows(Path(r.output)) if Path(r.output).is_dir() else [], write=False)
    except ResumeMismatch as exc:
        raise click.ClickException(f"{recipe}: {exc}")
    click.echo(f"{recipe}: ok ({r.num_images} images -> {r.output})")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json):
    """List installed plugins: name, stage, provider package, version, licence (and data terms)."""
    reg = get_registry()
    shared = {k for k in {(p.kind, p.name) for p in reg.entries} if sum((p.kind, p.name) == k for p in reg.entries) > 1}
    rows = [{"name": p.name, "stage": p.kind, "provider": p.provider, "version": p.version, "builtin": p.builtin,
             "qualified": f"{p.provider}:{p.name}", "clash": (p.kind, p.name) in shared,
             "licence": getattr(p.cls, "licence", None), "data_terms": getattr(p.cls, "data_terms", None)}  # synfer.engine.card
            for p in sorted(reg.entries, key=lambda p: (p.kind, p.name, not p.builtin))]
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failed": [{"entry_point": n, "error": m} for n, m in reg.failures],
                               "skipped": [{"entry_point": n, "why": w} for n, w in reg.skipped],
                               "label_spaces": reg.spaces}, indent=2))
        return
    for r in rows:
        clash = "  (name shared: use " + r["qualified"] + ")" if r["clash"] else ""
        terms = f"  [{r['licence'] or 'licence not declared'}{'; data: ' + r['data_terms'] if r['data_terms'] else ''}]"
        click.echo(f"{r['stage']:<20} {r['name']:<22} {r['provider']} {r['version']}{clash}{terms}")
    for name, why in reg.skipped:
        click.echo(f"skipped: {name} ({why})", err=True)
    # failures were already warned about, once each, while the registry loaded (synfer/logs.py)


@main.command()
@click.option("--fit", "fit", type=click.Path(exists=True, file_okay=False), default=None,
              help="A labelled folder (FEText): print the au_prior block whose AU statistics match its annotations.")
def labels(fit):
    """Show the label spaces, the AU set and the FAU-FE prior (or, with --fit, a recipe's au_prior fitted to data)."""
    if fit:
        return _fit_prior(fit)

    get_registry()  # plugins may declare label spaces
    click.echo("Label spaces:")
    for name, classes in L.LABEL_SPACES.items():
        click.echo(f"  {name:<11} {', '.join(classes)}")
    click.echo(f"\nAction units (scale: {L.AU_SCALE}):")
    for au, desc in L.AU_NAMES.items():
        click.echo(f"  AU{au:<3} {desc}")
    click.echo("\nFAU-FE prior (EMFACS prototypes):")
    for expr, aus in L.FAU_FE_PRIOR.items():
        click.echo(f"  {expr:<9} {', '.join(f'AU{a}' for a in aus) or '(none)'}")


def _fit_prior(folder: str) -> None:
    try:
        rows = [r for r in read_metadata(folder, verify=False) if r.get("aus") and (r.get("expression") or r.get("label"))]
        if not rows:
            raise DatasetError(f"{folder}: no row has both `aus` and an `expression` (or `label`); expected a FEText folder "
                               "from 'synfer fetext build' with an AU detector")
        fitted = L.fit_au_prior([L.au_vector(r["aus"]) for r in rows], [r.get("expression") or r["label"] for r in rows])
    except (DatasetError, ValueError) as exc:
        raise click.ClickException(str(exc))
    click.echo(f"# fitted to the AU annotations of {len(rows)} faces in {folder} (synfer labels --fit)")
    click.echo("au_prior:\n" + "".join(f"  {k}: {v}\n" for k, v in fitted.items()), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
