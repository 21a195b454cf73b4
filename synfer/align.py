"""Face alignment: a detected face -> the square crop experts and FEText read.

With 5 landmarks, a similarity transform (rotation, scale, shift; Umeyama's least squares)
sends them onto a fixed template, so eyes are level and at the same place in every crop.
The template is the common 5-point one of face recognition (eyes, nose tip, mouth corners
in a 112 x 112 crop), shrunk by `zoom` about the crop centre: zoom 1 is that tight crop
(brows to lower lip, like FER2013's faces; the experts' default), zoom 0.8 shows forehead and
chin (FEText's imagefolder crops and the face mesh use it). Without landmarks
the box is cut out and resized. numpy + PIL only; a detector plugin is built through the
registry, never imported.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from synfer.stages import DetectedFace

# (x, y) in a 112 x 112 crop: image-left eye, image-right eye, nose tip, left and right mouth corners.
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def template(size: int, zoom: float) -> np.ndarray:
    """The 5 template points for a size x size crop at `zoom` (points shrink about the centre)."""
    unit = TEMPLATE_112 / 112.0
    return ((unit - 0.5) * zoom + 0.5) * size


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix of the similarity transform taking points `src` closest to `dst` (Umeyama 1991)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    s0, d0 = src - ms, dst - md
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / max(s0.var(0).sum(), 1e-12)
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = md - scale * rot @ ms
    return m


def align_face(image, face: DetectedFace, size: int = 224, zoom: float = 1.0):
    """A size x size RGB crop of `face` in `image` (PIL), landmarks on the template when known."""
    from PIL import Image

    image = image.convert("RGB")
    if face.landmarks is None:
        x1, y1, x2, y2 = face.box
        return image.crop((round(x1), round(y1), round(x2), round(y2))).resize((size, size), Image.BICUBIC)
    m = similarity(np.asarray(face.landmarks, np.float64), template(size, zoom))
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]  # PIL maps output pixels back to input pixels
    return image.transform((size, size), Image.AFFINE, tuple(inv.reshape(-1)), resample=Image.BICUBIC)


def best_face(faces: list[DetectedFace]) -> DetectedFace | None:
    """The face a one-face-per-photo data set means: the largest box among the confident ones."""
    if not faces:
        return None
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


class Aligner:
    """Detect and align the main face of each image with a `face_detector` plugin block.

    `crops(images)` returns one aligned crop per image, or None where no face was found.
    """

    def __init__(self, detector: dict[str, Any] | None = None, size: int = 224, zoom: float = 1.0, registry=None):
        from synfer.plugins import get_registry

        self.block = dict(detector or {"plugin": "retinaface"})
        self.size, self.zoom = size, zoom
        self.detector = (registry or get_registry()).build("face_detector", self.block)

    def faces(self, images) -> list[DetectedFace | None]:
        return [best_face(f) for f in self.detector.detect(images)]

    def crops(self, images) -> list:
        return [None if f is None else self.detector.align(im, f, self.size, self.zoom)
                for im, f in zip(images, self.faces(images))]


def align_block(value) -> dict[str, Any] | None:
    """An expert's `align:` setting -> a face_detector block (None: no alignment).

    `true` means RetinaFace; a mapping is a face_detector block, optionally with `size` and `zoom`.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {"plugin": "retinaface"}
    if isinstance(value, dict) and "plugin" in value:
        return dict(value)
    raise ValueError(f"align: expected true/false or a face_detector block like {{plugin: retinaface, zoom: 1.0}}, got {value!r}")


def align_problems(value, path: str, registry) -> list[str]:
    """`synfer validate` lines for an expert's `align:` setting."""
    from synfer.recipe import stage_problems

    try:
        block = align_block(value)
    except ValueError as exc:
        return [f"{path}: {exc}"]
    if block is None:
        return []
    size, zoom = block.pop("size", 224), block.pop("zoom", 1.0)
    problems = [] if isinstance(size, int) and size >= 32 else [f"{path}.size: expected an integer >= 32, got {size!r}"]
    problems += [] if isinstance(zoom, (int, float)) and 0 < zoom <= 2 else [f"{path}.zoom: expected a number in (0, 2], got {zoom!r}"]
    return problems + stage_problems("face_detector", block, path, registry)


def aligner_for(value, size: int = 224, zoom: float = 1.0, registry=None) -> Aligner | None:
    """An Aligner from an `align:` setting (true, false, or a face_detector block with optional size/zoom)."""
    block = align_block(value)
    if block is None:
        return None
    return Aligner(block, int(block.pop("size", size)), float(block.pop("zoom", zoom)), registry)


def aligned_predict(predict, value, registry=None):
    """Wrap an expert's `predict(images)` so it sees aligned face crops; a photo without a face is shown whole."""
    aligner = aligner_for(value, registry=registry)
    if aligner is None:
        return predict

    def run(images):
        return predict([c if c is not None else im for im, c in zip(images, aligner.crops(images))])

    return run
