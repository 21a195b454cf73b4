"""register_commands adding `run`, `Plugins`, `train generator` and another plugin's `acme-hello`: each refused
with one warning naming both; `--help` lists every name once, the core's and the first owner's commands stay."""
import click

from synfer import hookimpl


def _cmd(name):
    return click.Command(name, help=f"acme-clash's {name}.", callback=lambda: click.echo(f"acme-clash {name}"))


@hookimpl
def register_commands(cli):
    for name in ("run", "Plugins", "acme-hello", "acme-own"):
        cli.add_command(_cmd(name))
    cli.subgroup("train").add_command(_cmd("generator"))
