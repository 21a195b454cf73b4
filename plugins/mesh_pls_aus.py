"""`au_detector: mesh-pls`: AU9, AU14 and AU17 from the inverse of py-feat's AU-to-mesh PLS map.

py-feat 2.1.5 ships `au_to_mesh_pls_v4.npz` (`synfer models fetch au-mesh-pls`): a linear map
from 20 AU intensities plus head pose (pitch, yaw, roll) to the 478-point MediaPipe mesh,
mesh = [au, pose] @ coef + intercept. Inverted, it reads AU scores off a mesh:

1. the face mesh synfer already runs (`landmarks`, MediaPipe 468 points) is aligned to the
   map's own mesh by a similarity transform (Procrustes, no reflection);
2. the 23 inputs are the ridge least-squares solution of aligned - intercept = x @ coef
   (lambda 1) jointly with a small similarity motion, realigned and solved again (2 rounds);
3. AU9, AU14 and AU17 are a linear read-out of those 23 scores, clipped to [0, 1]
   (`READOUT` below). The raw scores alone, less a neutral baseline, land at chance on the
   procedural world's ground truth (a mesh drawn from a person's own face shape moves them as
   much as an AU does), so the read-out is fitted on the procedural world's *train*
   identities and measured on its *test* identities: `python bench/mesh_pls_fit.py` prints
   both, and docs/assets.md states the F1.

Every other AU comes from the same mesh's geometry (`landmarks`). A face is not measured (None)
when the mesh finds no face (presence below `min_presence`) or the mesh does not fit the
map (RMS residual above `max_residual`, in the map's units, where the face is about 113 wide
between the eyes' outer corners).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from synfer import hookimpl
from synfer import labels as L
from synfer.stages import AUDetector, FaceRecord, StageConfig

BLIND_AUS = ("AU9", "AU14", "AU17")  # what the geometry cannot see; the read-out covers them
RIDGE = 1.0
ROUNDS = 2
# AU -> 23 weights on the PLS scores (AU01 ... AU43, Pitch, Yaw, Roll) and a bias, fitted on 400 procedural
# train-identity faces by `python bench/mesh_pls_fit.py` (seed 0), which prints this table.
READOUT: dict[str, tuple[float, ...]] = {
    "AU9": (-0.08399, -0.06748, 0.07608, -0.1506, 0.04354, -0.05735, 0.4825, -0.03371, -0.01952, -0.1371, -0.1607, 0.1063, 0.1202, 0.01712, 0.1109, -0.08398, 0.05661, -0.02906, 0.0502, -0.2071, 0.03963, -0.03433, -0.3, -0.06291),
    "AU14": (-0.04646, -0.02385, 0.07576, 0.0614, 0.03514, 0.02644, -0.1931, 0.05001, 0.05196, 0.1161, 0.07671, -0.004917, -0.2182, -0.1605, -0.1772, 0.07065, -0.05504, -0.1142, -0.03307, -0.05893, 0.07291, 0.1378, 0.09518, -0.09135),
    "AU17": (-0.08289, -0.03315, 0.09999, -0.2035, 0.04163, -0.07399, 0.4183, -0.03201, 0.02041, -0.152, -0.1571, 0.1136, 0.104, -0.05421, 0.1062, -0.1136, 0.05432, -0.03223, 0.01378, -0.2488, 0.0008156, -0.04705, -0.3399, -0.06487),
}


class PLSInverse:
    """The inverse of py-feat's AU + pose -> mesh PLS map on MediaPipe's first 468 points (numpy)."""

    def __init__(self, path: str | Path):
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            coef, intercept = z["coef"].astype(np.float64), z["intercept"].astype(np.float64)
            self.columns = [str(c) for c in z["input_columns"]]
        n = coef.shape[1] // 3  # the flat layout is axis-major: x_0..x_477 | y_0.. | z_0..
        self.basis = np.stack([coef[:, :n], coef[:, n:2 * n], coef[:, 2 * n:]], -1)[:, :468]  # (23, 468, 3)
        self.mean = np.stack([intercept[:n], intercept[n:2 * n], intercept[2 * n:]], -1)[:468]

    @staticmethod
    def align(x, y):
        """`x` moved onto `y` by the similarity transform that fits best (rotation, scale, shift; no reflection)."""
        import numpy as np

        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my
        u, s, vt = np.linalg.svd(xc.T @ yc)
        d = np.ones(3)
        d[2] = np.sign(np.linalg.det(u @ vt))
        r = (u * d) @ vt
        return (s * d).sum() / (xc ** 2).sum() * xc @ r + my

    def scores(self, points) -> tuple:
        """(23 PLS inputs, RMS residual per point) for one (468, 3) mesh in any frame."""
        import numpy as np

        x = np.asarray(points, np.float64)[:468, :3]
        k = len(self.columns)
        a = np.zeros(k)
        for _ in range(ROUNDS):
            template = self.mean + np.tensordot(a, self.basis, 1)
            aligned = self.align(x, template)
            # Solve for the AUs together with a small similarity motion of the mesh (3 shifts, 3 rotations, a scale,
            # linearised at the template): some AU directions are nearly rigid, and alternating alone converges slowly.
            c = template - template.mean(0)
            rigid = [np.broadcast_to(e, c.shape) for e in np.eye(3)] + [np.cross(e, c) for e in np.eye(3)] + [c]
            b = np.concatenate([self.basis.reshape(k, -1), np.stack([r.ravel() for r in rigid])]).T
            penalty = np.r_[np.full(k, RIDGE), np.full(len(rigid), 1e-6)]
            sol = np.linalg.solve(b.T @ b + np.diag(penalty), b.T @ (aligned - self.mean).ravel())
            a = sol[:k]
        aligned = self.align(x, self.mean + np.tensordot(a, self.basis, 1))
        residual = aligned - self.mean - np.tensordot(a, self.basis, 1)
        return a, float(np.sqrt((residual ** 2).sum(-1).mean()))


def readout(scores) -> dict[str, float]:
    """AU9, AU14, AU17 in [0, 1] from the 23 PLS scores."""
    import numpy as np

    x = np.append(np.asarray(scores, np.float64), 1.0)
    return {au: round(float(np.clip(x @ np.asarray(w), 0.0, 1.0)), 4) for au, w in READOUT.items()}


class MeshPLSAUDetector(AUDetector):
    """AU intensities from MediaPipe's face mesh: geometry for 13 AUs, the inverted py-feat PLS map for AU9/14/17."""

    name = "mesh-pls"
    licence = ("Apache-2.0 (MediaPipe's face mesh); py-feat's PLS map: MIT code, fitted on CelebV-HQ frames "
               "with py-feat Detectorv2 targets, redistribution terms left open by py-feat")

    class Config(StageConfig):
        weights: str | None = None  # face_landmark.tflite; None: 'synfer models fetch face-mesh'
        pls: str | None = None  # au_to_mesh_pls_v4.npz; None: 'synfer models fetch au-mesh-pls'
        detector: dict[str, Any] | None = {"plugin": "retinaface"}  # find and align the face first; None: images are aligned crops
        min_presence: float = Field(0.5, ge=0, le=1)  # the mesh's face score below which a face is not measured (aus: null)
        max_residual: float = Field(6.0, gt=0)  # RMS misfit to the PLS map above which a face is not measured

    @classmethod
    def problems(cls, config):
        from synfer.engine.fetch import weights_problems
        from synfer_plugins.landmark_aus import LandmarkAUDetector

        mesh = LandmarkAUDetector.Config(weights=config.weights, detector=config.detector, min_presence=config.min_presence)
        return LandmarkAUDetector.problems(mesh) + [p.replace("weights:", "pls:") for p in weights_problems(config.pls, "au-mesh-pls")]

    def __init__(self, config=None):
        super().__init__(config)
        from synfer_plugins.landmark_aus import LandmarkAUDetector

        c = self.config
        self._mesh = LandmarkAUDetector(LandmarkAUDetector.Config(weights=c.weights, detector=c.detector, min_presence=c.min_presence))
        self._pls = None

    @property
    def weights_path(self):
        from synfer.engine.fetch import default_path

        return self.config.pls or default_path("au-mesh-pls")

    @property
    def pls(self) -> PLSInverse:
        if self._pls is None:
            from synfer.engine.fetch import weights_file

            self._pls = PLSInverse(weights_file(self.config.pls, "au-mesh-pls", self.name))
        return self._pls

    def measure(self, points) -> dict[str, float] | None:
        """AU_KEYS -> intensity for one (468, 3) mesh, or None when it does not fit the PLS map."""
        from synfer_plugins.landmark_aus import features, intensities

        scores, residual = self.pls.scores(points)
        if residual > self.config.max_residual:
            return None
        out = intensities(features(points))
        out.update(readout(scores))
        return {k: out[k] for k in L.AU_KEYS}

    def detect(self, records: list[FaceRecord]) -> list[dict[str, float] | None]:
        if not records:
            return []
        pts, presence = self._mesh.landmarks([r.image for r in records])
        return [self.measure(p) if s >= self.config.min_presence else None for p, s in zip(pts, presence)]


@hookimpl
def register_stages(register):
    register(MeshPLSAUDetector)
