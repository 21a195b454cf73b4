"""A dataset folder as arrays for training and testing small classifiers (tiny-cnn, FERAnno, the downstream benchmark)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from synfer.contract import labels as L
from synfer.engine.dataset import read_metadata, row_label


def load_arrays(root: str | Path, label_space: str = "affectnet8", size: int | None = None, kept_only: bool = True,
                label_key: str | None = None, limit: int | None = None):
    """A dataset folder -> (uint8 images (N,H,W,3), class indices (N,), AU intensities (N,16), rows).

    FEText folders carry `expression`; generated ones carry the final `label` (and `kept`).
    `size` resizes (bicubic) when the images differ from it.
    """
    from PIL import Image  # heavy

    root = Path(root)
    rows = read_metadata(root)
    if kept_only:
        rows = [r for r in rows if r.get("kept", True)]
    # One row schema (synfer.engine.dataset.row_label): FEText rows name the class in `expression`, generated ones in `label`.

    name = (lambda r: L.canonical(r[label_key]) if r.get(label_key) else None) if label_key else row_label
    classes = L.label_space(label_space)
    rows = [r for r in rows if name(r) in classes][:limit]
    imgs = []
    for r in rows:
        with Image.open(root / r["file_name"]) as im:
            im = im.convert("RGB")
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            imgs.append(np.asarray(im))
    x = np.stack(imgs) if imgs else np.zeros((0, size or 64, size or 64, 3), np.uint8)
    y = np.array([classes.index(name(r)) for r in rows], dtype=np.int64)
    aus = np.stack([L.au_vector(r.get("aus")) for r in rows]) if rows else np.zeros((0, len(L.AU_KEYS)), np.float32)
    return x, y, aus, rows


def soft_targets(rows: list[dict], y, num_classes: int):
    """The rows' soft labels as (N, classes) float32; a row without one (or of another length) gets its one-hot class."""
    p = np.eye(num_classes, dtype=np.float32)[y]
    for i, r in enumerate(rows):
        soft = r.get("soft_label")
        if soft and len(soft) == num_classes:
            p[i] = np.asarray(soft, np.float32) / max(float(sum(soft)), 1e-8)
    return p
