"""`synfer train ...`: the group; its subcommands come from the plugins that train something (hook
`register_commands`: `generator`, `au-adapter`, `vae` from "sd", `calibrator` from "feranno", `classifier`,
`au-detector` from "tiny-cnn"). They share one loop, synfer.engine.training.run_training."""
from __future__ import annotations

import click

from synfer.commands.options import apply_to_subcommands, threads_option


@apply_to_subcommands
@click.group("train")
@threads_option
def train_cli(threads):
    """Train the models of the method (runs under torchrun for several GPUs); plugins add the subcommands."""
