"""Faces in photos: a detected face (box, score, 5 landmarks) and the square crop experts and FEText read.

With 5 landmarks, a similarity transform (rotation, scale, shift; Umeyama's least squares)
sends them onto a fixed template, so eyes are level and at the same place in every crop.
The template is the common 5-point one of face recognition (eyes, nose tip, mouth corners
in a 112 x 112 crop), shrunk by `zoom` about the crop centre: zoom 1 is that tight crop
(brows to lower lip, like FER2013's faces; the experts' default), zoom 0.8 shows forehead and
chin (FEText's imagefolder crops and the face mesh use it). Without landmarks
the box is cut out and resized. numpy + PIL only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DetectedFace:
    """One face a `face_detector` found: pixel box, confidence, and 5 landmarks when it has them."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the input image
    score: float
    landmarks: list[tuple[float, float]] | None = None  # eye, eye, nose tip, mouth corner, mouth corner (image-left first)


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
    from PIL import Image  # heavy

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
