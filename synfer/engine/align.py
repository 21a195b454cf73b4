"""Face alignment for the engine: an expert's `align:` setting -> a `face_detector` plugin that finds the main
face of each photo, and its crop (synfer.contract.faces). A detector plugin is built through the registry, never
imported.
"""
from __future__ import annotations

from typing import Any

from synfer.contract.faces import DetectedFace, best_face
from synfer.engine.registry import block_problems, get_registry


class Aligner:
    """Detect and align the main face of each image with a `face_detector` plugin block.

    `crops(images)` returns one aligned crop per image, or None where no face was found.
    """

    def __init__(self, detector: dict[str, Any] | None = None, size: int = 224, zoom: float = 1.0, registry=None):
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
    try:
        block = align_block(value)
    except ValueError as exc:
        return [f"{path}: {exc}"]
    if block is None:
        return []
    size, zoom = block.pop("size", 224), block.pop("zoom", 1.0)
    problems = [] if isinstance(size, int) and size >= 32 else [f"{path}.size: expected an integer >= 32, got {size!r}"]
    problems += [] if isinstance(zoom, (int, float)) and 0 < zoom <= 2 else [f"{path}.zoom: expected a number in (0, 2], got {zoom!r}"]
    return problems + block_problems("face_detector", block, path, registry)


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
