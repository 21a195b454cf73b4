"""AU detectors (paper 4.2.1): AU intensities in [0, 1] keyed by synfer.labels.AU_KEYS.

`ground-truth` passes through the AUs a source already knows (the procedural world
renders faces from them). Model-backed detectors go next to it, each converting its own
scale (FACS 0-5, binary occurrence) to the project's 0-1 intensity at this boundary.
"""
from __future__ import annotations

from synfer import hookimpl
from synfer import labels as L
from synfer.stages import AUDetector, FaceRecord, StageConfig


class GroundTruthAUDetector(AUDetector):
    """Returns each record's own `aus` (e.g. from the procedural source), checked and completed."""

    name = "ground-truth"
    licence = "MIT (reads the procedural world's own AUs; no weights)"

    class Config(StageConfig):
        pass

    def detect(self, records: list[FaceRecord]) -> list[dict[str, float]]:
        out = []
        for i, r in enumerate(records):
            if r.aus is None:
                raise ValueError(
                    f"au_detector 'ground-truth' got record {i} (source {r.source or '?'!r}, identity {r.identity!r}) "
                    f"without AUs: it only passes through AUs a source already provides (e.g. source 'procedural'). "
                    f"Use a model-based au_detector for sources without ground-truth AUs.")
            vec = L.au_vector(r.aus)  # rejects unknown keys, fills missing AUs with 0
            if (vec < 0).any() or (vec > 1).any():
                raise ValueError(f"record {i} has AU intensities outside [0, 1] ({L.AU_SCALE}): {r.aus}")
            out.append(L.au_dict(vec))
        return out


@hookimpl
def register_stages(register):
    register(GroundTruthAUDetector)
