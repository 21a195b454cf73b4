"""A plugin that owns a command (hook register_commands), and one whose hook fails: only its commands are lost."""
import click

from synfer import hookimpl


@click.command("acme-hello")
def hello():
    """Say hello from a plugin."""
    click.echo("hello from acme-commands")


@hookimpl
def register_commands(cli):
    cli.add_command(hello)
    cli.subgroup("train").add_command(click.Command("acme-model", help="Train acme's model.", callback=lambda: click.echo("trained")))


class Broken:
    @staticmethod
    @hookimpl
    def register_commands(cli):
        cli.subgroup("no-such-group")


broken = Broken()
