"""`synfer fetext preview`: the procedural face world's own command (hook register_commands)."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("preview")
@click.option("--out", default="docs/preview.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--size", default=64, show_default=True, help="Side of one face in pixels.")
@click.option("--identities", default=8, show_default=True, help="Columns: one procedural identity each.")
@click.option("--seed", default=0, show_default=True)
def preview(out, size, identities, seed):
    """Write a grid of procedural faces: one row per expression, one column per identity."""
    from synfer_plugins.procedural.source import preview_grid

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    preview_grid(out, size=size, identities=identities, seed=seed)
    click.echo(f"wrote {out}")
