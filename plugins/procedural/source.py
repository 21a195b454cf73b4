"""The `procedural` Source plugin (FEText faces with ground truth) and the preview grid."""
from __future__ import annotations

from dataclasses import asdict
from typing import Iterator, Literal

import numpy as np
from pydantic import Field, model_validator

from synfer import labels as L
from synfer.engine.recipe import LabelSpaceName, Mix, Seed
from synfer.stages import FaceRecord, Source, StageConfig
from synfer_plugins.procedural.identity import (MAX_IDENTITIES, SPLIT_OFFSET, Identity, identity_id, sample_expression_aus,
                                                sample_identity, split_identities)
from synfer_plugins.procedural.raster import render_faces


class ProceduralSource(Source):
    """Faces of the procedural world with ground-truth expression, AUs and identity."""

    name = "procedural"
    licence = "MIT (synfer's own)"
    data_terms = "MIT (synfer's own procedural faces: no real person)"

    class Config(StageConfig):
        num_images: int = Field(1000, gt=0)
        size: int = Field(64, ge=16, le=1024)  # pixels (square)
        seed: Seed = 0  # picks expressions, identities, AUs and poses per image index
        split: Literal["train", "test"] = "train"  # identity pools of the splits are disjoint
        num_identities: int = Field(200, gt=0, le=MAX_IDENTITIES)
        expressions: Mix = None  # mix (names or name->weight, weights >= 0 summing above 0); default: the label space
        label_space: LabelSpaceName = "affectnet8"
        extra_au_rate: float = Field(0.08, ge=0, le=1)  # chance of each weak distractor AU
        batch_size: int = Field(256, gt=0)  # render batch (memory vs speed only; output is identical)

        @model_validator(mode="after")
        def _mix_in_space(self):
            space = L.label_space(self.label_space)
            bad = [e for e in self.expressions or [] if L.canonical(e) not in space]
            if bad:
                raise ValueError(f"expressions {bad} are not in label space {self.label_space!r} ({', '.join(space)})")
            return self

    def mix(self) -> tuple[list[str], np.ndarray]:
        e = self.config.expressions
        if e is None:
            names, w = list(L.label_space(self.config.label_space)), None
        elif isinstance(e, dict):
            names, w = [L.canonical(k) for k in e], np.array(list(e.values()), dtype=np.float64)
        else:
            names, w = [L.canonical(k) for k in e], None
        w = np.ones(len(names)) if w is None else w
        return names, w / w.sum()

    def plan(self, index: int, identities: list[Identity], names, weights):
        """(expression, identity, AU vector, render seed) of image `index`: depends only on (seed, index)."""
        rng = np.random.default_rng(L.sample_seed(self.config.seed, index))
        expr = names[int(rng.choice(len(names), p=weights))]
        ident = identities[int(rng.integers(len(identities)))]
        aus = sample_expression_aus(expr, rng, self.config.extra_au_rate)
        return expr, ident, aus, int(rng.integers(1 << 32))

    def records(self) -> Iterator[FaceRecord]:
        from PIL import Image

        cfg = self.config
        identities = split_identities(cfg.split, cfg.num_identities)
        names, weights = self.mix()
        for start in range(0, cfg.num_images, cfg.batch_size):
            plans = [self.plan(i, identities, names, weights) for i in range(start, min(start + cfg.batch_size, cfg.num_images))]
            imgs = render_faces(np.stack([p[2] for p in plans]), [p[1] for p in plans], cfg.size, [p[3] for p in plans])
            for (expr, ident, aus, _), img in zip(plans, imgs):
                yield FaceRecord(image=Image.fromarray(img), expression=expr, aus=L.au_dict(aus), caption=None,
                                 source="procedural", identity=identity_id(ident), attributes=asdict(ident))


def preview_grid(path, size: int = 64, identities: int = 8, seed: int = 0, label_space: str = "affectnet8"):
    """Write a PNG grid: one row per expression (labelled at left), one column per identity."""
    from PIL import Image, ImageDraw

    exprs = L.label_space(label_space)
    idents = [sample_identity(SPLIT_OFFSET["train"] + seed * identities + k) for k in range(identities)]
    aus, ids, seeds = [], [], []
    for r, e in enumerate(exprs):
        for k, ident in enumerate(idents):
            rng = np.random.default_rng(L.sample_seed(seed, r * 1000 + k))
            aus.append(L.AUPrior(low=0.7).sample(e, rng))
            ids.append(ident)
            seeds.append(int(rng.integers(1 << 32)))
    imgs = render_faces(np.stack(aus), ids, size, seeds)
    label_w, pad = 64, 2
    grid = Image.new("RGB", (label_w + len(idents) * (size + pad), len(exprs) * (size + pad)), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    for r, e in enumerate(exprs):
        d.text((4, r * (size + pad) + size // 2 - 5), e, fill=(0, 0, 0))
        for k in range(len(idents)):
            grid.paste(Image.fromarray(imgs[r * len(idents) + k]), (label_w + k * (size + pad), r * (size + pad)))
    grid.save(path)
    return grid
