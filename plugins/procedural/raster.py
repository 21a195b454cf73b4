"""Raster: the draw list of a batch of faces (face_parts) posed, lit and drawn with PIL.

Every shape is rasterised with ImageDraw at `ss`x the output size and box-downsampled
(anti-aliasing); lighting and sensor noise are added to the batch at the end. A face depends
only on (AUs, identity, seed), never on the batch it was drawn in.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from synfer import labels as L
from synfer.engine.seeds import stream_rng
from synfer_plugins.procedural.face_parts import build_ops, identity_arrays
from synfer_plugins.procedural.identity import Identity


def _supersample(size: int) -> int:
    return 4 if size <= 48 else 3 if size <= 96 else 2


def render_faces(aus: np.ndarray, identities: Sequence[Identity], size: int = 64, seeds: Sequence[int] | int = 0) -> np.ndarray:
    """Faces (N, size, size, 3) uint8 from AU intensities (N, 16) in AU_IDS order and identities.

    `seeds` (one int per face, or one int from which per-face seeds derive) picks the
    pose (tilt, shift, scale), the lighting, the noise and the side of AU14.
    """
    from PIL import Image, ImageDraw

    aus = np.clip(np.asarray(aus, dtype=np.float64).reshape(-1, len(L.AU_IDS)), 0, 1)
    n = len(aus)
    if len(identities) != n:
        raise ValueError(f"got {n} AU vectors but {len(identities)} identities; pass one identity per face")
    if np.isscalar(seeds):
        seeds = [L.sample_seed(int(seeds), i) for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"got {n} AU vectors but {len(seeds)} seeds; pass one seed per face")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if n == 0:
        return np.zeros((0, size, size, 3), np.uint8)

    pose = np.zeros((n, 9))
    for i, sd in enumerate(seeds):
        r = stream_rng(sd, "procedural.pose")
        pose[i] = (r.uniform(-0.11, 0.11), r.uniform(-0.03, 0.03), r.uniform(-0.02, 0.03), r.uniform(0.94, 1.05),
                   r.uniform(0, 2 * np.pi), r.uniform(0.05, 0.3), r.uniform(1.0, 3.5), r.choice([-1, 1]), 0)
    A = {au: aus[:, k] for k, au in enumerate(L.AU_IDS)}
    I = identity_arrays(identities)
    ops = build_ops(A, I, pose[:, 7])

    ss = _supersample(size)
    S = size * ss
    cos, sin = np.cos(pose[:, 0])[:, None], np.sin(pose[:, 0])[:, None]
    cx, cy, sc = (0.5 + pose[:, 1])[:, None], (0.47 + pose[:, 2])[:, None], pose[:, 3][:, None]
    drawn = []
    for kind, pts, color, width, mask in ops.items:
        x, y = pts[..., 0], pts[..., 1]
        px = (cx + sc * (cos * x - sin * y)) * S
        py = (cy + sc * (sin * x + cos * y)) * S
        xy = np.stack([px, py], -1).reshape(n, -1).tolist()
        w = max(1, int(round(width * S))) if kind == "line" else 0
        drawn.append((kind == "line", xy, [tuple(v) for v in np.clip(color, 0, 255).round().astype(int).tolist()], w, mask))

    # Background: a two-colour linear gradient per identity.
    g = np.linspace(-0.5, 0.5, 8)
    ang = I["background_angle"][:, None, None]
    ramp = np.clip(0.5 + np.cos(ang) * g[None, None, :] + np.sin(ang) * g[None, :, None], 0, 1)[..., None]
    bg = (I["background"][:, None, None] * (1 - ramp) + I["background2"][:, None, None] * ramp).astype(np.uint8)

    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        im = Image.fromarray(bg[i]).resize((S, S), Image.BILINEAR)
        d = ImageDraw.Draw(im)
        for is_line, xy, color, w, mask in drawn:
            if mask[i]:
                if is_line:
                    d.line(xy[i], fill=color[i], width=w)
                else:
                    d.polygon(xy[i], fill=color[i])
        out[i] = np.asarray(im.reduce(ss))

    # Lighting gradient and sensor noise, per face from its own seed.
    img = out.astype(np.float32)
    g = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    la, ls = pose[:, 4][:, None, None], pose[:, 5][:, None, None]
    light = 1 + ls * (np.cos(la) * g[None, None, :] + np.sin(la) * g[None, :, None])
    img *= light[..., None].astype(np.float32)
    for i, sd in enumerate(seeds):
        r = stream_rng(sd, "procedural.noise")
        img[i] += r.standard_normal((size, size, 3), dtype=np.float32) * np.float32(pose[i, 6])
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_face(aus, identity: Identity, size: int = 64, seed: int = 0):
    """One face as a PIL image; `aus` is an AU vector (16,) or a {'AU6': 0.8, ...} dict."""
    from PIL import Image

    vec = L.au_vector(aus) if isinstance(aus, dict) else np.asarray(aus, dtype=np.float64)
    return Image.fromarray(render_faces(vec[None], [identity], size, [seed])[0])
