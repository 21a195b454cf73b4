"""`synfer bootstrap RECIPE`: run a chain of synfer commands (e.g. the one that trains the shipped
tiny models), skipping steps whose output already exists, and record each step's wall time."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from synfer.engine.dataset import write_json
from synfer.engine.registry import pydantic_problems


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    run: str  # a synfer command line without the leading `synfer`
    # skip the step when this path (or any path of the list) exists; delete it to redo the step. A list lets an
    # intermediate step name the final output too: a clone that ships the final model skips its inputs' steps
    creates: str | list[str] | None = None

    def done(self) -> str | None:
        paths = [self.creates] if isinstance(self.creates, str) else self.creates or []
        return next((p for p in paths if Path(p).exists()), None)


class Bootstrap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: list[Step]
    times: str = "out/bootstrap-times.json"  # wall time of each step, merged across runs


@click.command("bootstrap")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--only", default=None, help="Run just this step (by name).")
@click.option("--dry-run", is_flag=True, help="Print the commands without running them.")
def bootstrap_cli(recipe, only, dry_run):
    """Run the steps of a bootstrap RECIPE in order (resumable: finished steps are skipped)."""
    try:
        plan = Bootstrap(**(yaml.safe_load(Path(recipe).read_text()) or {}))
    except ValidationError as exc:
        raise click.ClickException(f"{recipe}:\n  " + "\n  ".join(pydantic_problems(exc)))
    times_path = Path(plan.times)
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    for step in plan.steps:
        if only and step.name != only:
            continue
        if not only and (done := step.done()):
            click.echo(f"[skip] {step.name}: {done} exists")
            continue
        cmd = [sys.executable, "-m", "synfer", *shlex.split(step.run)]
        click.echo(f"[run ] {step.name}: synfer {step.run}")
        if dry_run:
            continue
        t0 = time.time()
        result = subprocess.run(cmd)
        if result.returncode != 0:
            raise click.ClickException(f"step {step.name!r} failed (exit {result.returncode}); fix it and rerun: finished steps are skipped")
        times[step.name] = round(time.time() - t0, 1)
        times_path.parent.mkdir(parents=True, exist_ok=True)

        write_json(times_path, times)
        click.echo(f"[done] {step.name}: {times[step.name]:.0f} s")
