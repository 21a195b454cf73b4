"""Click options the command groups share: `--threads` (synfer.engine.threads decides the count)."""
from __future__ import annotations

import copy
import functools

import click

from synfer.engine import threads
from synfer.engine.threads import ENV, parse

OPTION_HELP = "CPU threads torch uses: 'auto' (free cores, 1 per torchrun worker, OMP_NUM_THREADS if set) or a number."


def threads_option(f):
    """The `--threads` option (env SYNFER_THREADS) of `synfer train` and `synfer fetext build`."""
    return click.option("--threads", default="auto", envvar=ENV, show_default=True, help=OPTION_HELP,
                        callback=lambda ctx, param, v: _checked(v))(f)


def _checked(value):
    try:
        return parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc))


def apply_to_subcommands(group):
    """Make every subcommand of click group `group` (one with a `--threads` option) call `configure` first,
    after its own arguments parsed: `synfer train generator --help` still imports no torch."""
    resolve = group.resolve_command

    def resolve_command(ctx, args):
        name, cmd, rest = resolve(ctx, args)
        if cmd is not None and cmd.callback is not None:
            cmd, inner = copy.copy(cmd), cmd.callback

            @functools.wraps(inner)
            def callback(*a, **kw):
                threads.configure(ctx.params.get("threads", "auto"))  # looked up now: tests replace it
                return inner(*a, **kw)
            cmd.callback = callback
        return name, cmd, rest

    group.resolve_command = resolve_command
    return group
