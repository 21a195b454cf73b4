"""`au_detector: landmarks`: AU intensities from a real face mesh (paper 4.2.1's AU annotation).

MediaPipe's face mesh (`face_landmark.tflite` from the mediapipe==0.10.21 wheel, Apache-2.0;
`synfer models fetch face-mesh`) gives 468 points on a 192 x 192 aligned face crop; it runs in
torch through synfer_plugins.tflite_torch. Each AU is a geometric ratio in a face frame (x along
the eye line, y down), divided by the inter-ocular distance, so it does not depend on the
face's size or roll; its intensity is how far the ratio moves from a neutral baseline, in
units of a full-strength change, clipped to [0, 1]:

    intensity = clip(sign * (ratio - baseline) / span, 0, 1)

Baselines are medians over the 100 faces of scikit-image's `lfw_subset` (mostly neutral or
slightly smiling press photos; `python bench/landmark_baselines.py` prints them), spans are the change a
strong, posed action gives. What the mesh can see: brow raise (AU1 inner, AU2 outer), brow
lowering (AU4), upper-lid raise (AU5), eye narrowing (AU6 and AU7, which it cannot tell
apart: both get the same squint value), upper-lip raise (AU10, nose-to-lip distance), lip-corner
pull and depression (AU12, AU15), lip stretch (AU20), lip narrowing (AU23), lips apart (AU25),
jaw drop (AU26). What it cannot see: AU9 (nose wrinkles are texture, not shape), AU14 (dimples)
and AU17 (chin boss): those stay 0.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from synfer import hookimpl
from synfer.engine.fetch import default_path
from synfer import labels as L
from synfer.stages import AUDetector, FaceRecord, StageConfig

MESH_SIZE = 192
ZOOM = 0.8  # the aligned crop the mesh sees (synfer.engine.align), forehead to chin with a margin

# Face-mesh indices (subject's right = image left).
R_EYE = {"outer": 33, "inner": 133, "upper": 159, "lower": 145}
L_EYE = {"outer": 263, "inner": 362, "upper": 386, "lower": 374}
R_BROW = {"inner": 107, "outer": 70}
L_BROW = {"inner": 336, "outer": 300}
MOUTH = {"right": 61, "left": 291, "upper_out": 0, "upper_in": 13, "lower_in": 14, "lower_out": 17}
NOSE_BOTTOM, NOSE_TIP, CHIN = 2, 1, 152

MOUTH_OPEN_BASE = 0.060
# AU -> (feature, sign, baseline, span). Baselines: medians over lfw_subset (see the module doc).
AU_GEOMETRY: dict[str, tuple[str, float, float, float]] = {
    "AU1": ("inner_brow", 1, 0.375, 0.15),
    "AU2": ("outer_brow", 1, 0.264, 0.12),
    "AU4": ("inner_brow", -1, 0.375, 0.10),
    "AU5": ("eye_open", 1, 0.125, 0.08),
    "AU6": ("eye_open", -1, 0.125, 0.06),
    "AU7": ("eye_open", -1, 0.125, 0.06),
    "AU10": ("nose_lip", -1, 0.219, 0.10),
    "AU12": ("corner_lift", 1, 0.0, 0.10),  # baseline 0 by definition: corners level with the lip line
    "AU15": ("corner_lift", -1, 0.0, 0.08),
    "AU20": ("mouth_width", 1, 0.816, 0.25),  # then damped by AU12: a smile widens the mouth too
    "AU23": ("lip_height", -1, 0.220, 0.10),
    "AU25": ("mouth_open", 1, MOUTH_OPEN_BASE, 0.25),  # inner-lip gap over mouth width: an O-mouth counts fully
    "AU26": ("jaw", 1, 0.968, 0.30),
}
BLIND = ("AU9", "AU14", "AU17")  # not visible in mesh geometry: always 0


def features(points) -> dict[str, float]:
    """Geometric ratios of one face mesh ((468, 2+) array, pixels), in inter-ocular units."""
    import numpy as np

    p = np.asarray(points, dtype=np.float64)[:, :2]
    re = p[[R_EYE["outer"], R_EYE["inner"]]].mean(0)
    le = p[[L_EYE["outer"], L_EYE["inner"]]].mean(0)
    iod = float(np.linalg.norm(le - re))
    ex = (le - re) / max(iod, 1e-9)
    ey = np.array([-ex[1], ex[0]])  # down in the image for an upright face
    centre = (re + le) / 2
    q = (p - centre) @ np.stack([ex, ey], 1) / max(iod, 1e-9)  # face frame: x right, y down, unit = IOD
    y = q[:, 1]

    def pair(a, b):
        return (a + b) / 2

    eye_line_inner = pair(y[R_EYE["inner"]], y[L_EYE["inner"]])
    eye_line_outer = pair(y[R_EYE["outer"]], y[L_EYE["outer"]])
    lip_mid = pair(y[MOUTH["upper_in"]], y[MOUTH["lower_in"]])
    return {
        "inner_brow": float(eye_line_inner - pair(y[R_BROW["inner"]], y[L_BROW["inner"]])),  # brow height above the eye
        "outer_brow": float(eye_line_outer - pair(y[R_BROW["outer"]], y[L_BROW["outer"]])),
        "eye_open": float(pair(y[R_EYE["lower"]] - y[R_EYE["upper"]], y[L_EYE["lower"]] - y[L_EYE["upper"]])),
        "nose_lip": float(y[MOUTH["upper_out"]] - y[NOSE_BOTTOM]),
        "corner_lift": float(lip_mid - pair(y[MOUTH["right"]], y[MOUTH["left"]])),  # corners above the lip centre
        "mouth_width": float(abs(q[MOUTH["left"], 0] - q[MOUTH["right"], 0])),
        "lip_height": float((y[MOUTH["upper_in"]] - y[MOUTH["upper_out"]]) + (y[MOUTH["lower_out"]] - y[MOUTH["lower_in"]])),
        "lip_gap": float(max(y[MOUTH["lower_in"]] - y[MOUTH["upper_in"]], 0.0)),
        "mouth_open": float(max(y[MOUTH["lower_in"]] - y[MOUTH["upper_in"]], 0.0) / max(abs(q[MOUTH["left"], 0] - q[MOUTH["right"], 0]), 1e-6)),
        "jaw": float(y[CHIN] - y[NOSE_TIP]),
    }


def intensities(feats: dict[str, float]) -> dict[str, float]:
    """AU_KEYS -> intensity in [0, 1] from `features()`; the blind AUs are 0."""
    out = {k: 0.0 for k in L.AU_KEYS}
    for au, (name, sign, base, span) in AU_GEOMETRY.items():
        out[au] = min(max(sign * (feats[name] - base) / span, 0.0), 1.0)
    out["AU20"] *= 1.0 - out["AU12"]  # lip stretch is a wide mouth whose corners do not rise
    return {k: round(v, 4) for k, v in out.items()}


class LandmarkAUDetector(AUDetector):
    """AU intensities from MediaPipe's 468-point face mesh (geometric ratios, per-face normalised)."""

    name = "landmarks"
    licence = "Apache-2.0 (MediaPipe 0.10.21's face mesh weights)"
    weights_path = property(lambda self: self.config.weights or default_path("face-mesh"))

    class Config(StageConfig):
        weights: str | None = None  # face_landmark.tflite; None: 'synfer models fetch face-mesh'
        detector: dict[str, Any] | None = {"plugin": "retinaface"}  # find and align the face first; None: images are aligned crops (zoom 0.8)
        min_presence: float = Field(0.5, ge=0, le=1)  # the mesh's face score below which a face is not measured (aus: null)

    @classmethod
    def problems(cls, config):
        from synfer.engine.align import align_problems
        from synfer.engine.fetch import weights_problems
        from synfer.engine.registry import get_registry

        out = weights_problems(config.weights, "face-mesh")
        return out + (align_problems(config.detector, "detector", get_registry()) if config.detector is not None else [])

    def __init__(self, config=None):
        super().__init__(config)
        self._mesh = None
        self._aligner = None

    @property
    def mesh(self):
        if self._mesh is None:
            from synfer.engine.fetch import weights_file
            from synfer_plugins.tflite_torch import build_tflite_graph

            path = weights_file(self.config.weights, "face-mesh", "landmarks")
            self._mesh = build_tflite_graph(path, logits=False)
        return self._mesh

    def landmarks(self, images) -> tuple:
        """((N, 468, 3) mesh points in pixels of the 192 x 192 aligned crop, (N,) face presence in [0, 1])."""
        import numpy as np
        import torch
        from PIL import Image

        if self.config.detector is not None:
            if self._aligner is None:
                from synfer.engine.align import Aligner

                self._aligner = Aligner(self.config.detector, MESH_SIZE, ZOOM)
            crops = [c if c is not None else im.convert("RGB").resize((MESH_SIZE, MESH_SIZE), Image.BICUBIC)
                     for im, c in zip(images, self._aligner.crops(images))]
        else:
            crops = [im.convert("RGB").resize((MESH_SIZE, MESH_SIZE), Image.BICUBIC) for im in images]
        x = torch.from_numpy(np.stack([np.asarray(c, np.float32) for c in crops]) / 127.5 - 1.0)
        with torch.no_grad():
            pts, flag = self.mesh(x)
        return pts.reshape(len(crops), -1, 3).numpy(), torch.sigmoid(flag.reshape(-1)).numpy()

    def detect(self, records: list[FaceRecord]) -> list[dict[str, float] | None]:
        if not records:
            return []
        pts, presence = self.landmarks([r.image for r in records])
        out = []
        for p, s in zip(pts, presence):
            out.append(intensities(features(p)) if s >= self.config.min_presence else None)  # no face: not measured
        return out


@hookimpl
def register_stages(register):
    register(LandmarkAUDetector)
