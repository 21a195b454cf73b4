"""The procedural face world: frontal faces drawn from FACS action units and an identity.

It stands in for FFHQ/AffectNet (docs/design.md, "The procedural face world"): every face comes
with ground-truth AUs, its expression and its identity attributes, so the whole method
runs and is measured on a CPU. Each AU of synfer.labels.AU_IDS moves what a FACS coder
expects (brows for 1/2/4, lids for 5/6/7, nose for 9, lips for 10-26), exaggerated so
that the eight AffectNet classes read at 64x64.

Rendering is batched: the geometry of every shape is computed for the whole batch with
numpy, then each face is rasterised with PIL ImageDraw at `ss`x the output size and
box-downsampled (anti-aliasing); lighting and noise are added to the batch at the end.
A face depends only on (AUs, identity, seed), never on the batch it was drawn in.

AU14 (dimpler) is drawn on one side (picked by the seed) and draws the lip-corner pull
of AU12 toward that side, so the contempt prototype 12 + 14 renders as a unilateral smirk.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
from pydantic import Field, field_validator, model_validator

from synfer import hookimpl
from synfer import labels as L
from synfer.stages import FaceRecord, Source, StageConfig

# ---------------------------------------------------------------- identity

SKIN_TONES = {  # name -> RGB
    "fair": (246, 222, 204), "light": (236, 200, 172), "medium": (214, 170, 132),
    "olive": (198, 160, 116), "tan": (176, 128, 90), "brown": (136, 94, 64), "dark": (92, 62, 44),
}
HAIR_COLORS = {
    "black": (28, 24, 24), "dark brown": (62, 42, 30), "brown": (110, 74, 44), "auburn": (140, 62, 36),
    "blonde": (214, 180, 112), "red": (176, 74, 34), "grey": (150, 148, 146), "white": (226, 224, 220),
}
EYE_COLORS = {
    "brown": (96, 58, 30), "dark brown": (52, 32, 20), "blue": (64, 118, 178), "green": (70, 128, 80),
    "hazel": (128, 102, 50), "grey": (116, 124, 132),
}
HAIR_STYLES = ("none", "short", "long", "bob", "bun", "fringe")
GLASSES = ("none", "round", "square")
FACIAL_HAIR = ("none", "stubble", "moustache", "beard")

# Identity seeds of the two splits come from disjoint ranges: a held-out test measures
# generalisation to faces never seen in training.
SPLIT_OFFSET = {"train": 0, "test": 1 << 30}
MAX_IDENTITIES = 1 << 30


@dataclass(frozen=True)
class Identity:
    """Who is in the picture: everything about a face that is not its expression."""

    seed: int
    face_width: float  # half-width, canvas units
    face_height: float  # half-height
    jaw_taper: float  # 0 square jaw .. 1 pointed chin
    skin_tone: str
    skin: tuple[int, int, int]
    eye_spacing: float  # half the distance between the eye centres
    eye_width: float  # half-width of one eye
    eye_open: float  # resting lid aperture factor
    eye_tilt: float  # outer corner up (+) or down (-)
    eye_color_name: str
    eye_color: tuple[int, int, int]
    brow_thickness: float
    brow_arch: float
    nose_size: float
    mouth_width: float  # half-width at rest
    lip_thickness: float
    hair_style: str
    hair_color_name: str
    hair_color: tuple[int, int, int]
    glasses: str
    glasses_color: tuple[int, int, int]
    facial_hair: str
    age: float  # 0 young .. 1 elderly (wrinkles, grey hair)
    background: tuple[int, int, int]
    background2: tuple[int, int, int]
    background_angle: float
    clothes: tuple[int, int, int]


def _rgb(c, rng, jitter=8) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.asarray(c) + rng.integers(-jitter, jitter + 1, 3), 0, 255))


def sample_identity(seed: int) -> Identity:
    """A deterministic identity for `seed`."""
    rng = np.random.default_rng([int(seed), 0x1D])
    age = float(rng.beta(1.6, 2.2))
    tone = str(rng.choice(list(SKIN_TONES)))
    if age > 0.7 and rng.random() < 0.7:
        hair_name = str(rng.choice(["grey", "white"]))
    else:
        hair_name = str(rng.choice(["black", "dark brown", "brown", "auburn", "blonde", "red"], p=[.26, .24, .2, .1, .13, .07]))
    style = str(rng.choice(HAIR_STYLES, p=[.1, .26, .22, .16, .1, .16]))
    facial = str(rng.choice(FACIAL_HAIR, p=[.64, .12, .1, .14]))
    eye_name = str(rng.choice(list(EYE_COLORS), p=[.34, .2, .16, .1, .12, .08]))
    hue = rng.uniform(0, 2 * np.pi)
    base = 150 + 70 * np.cos(hue + np.array([0.0, 2.1, 4.2]))
    bg1 = _rgb(base * rng.uniform(0.7, 1.05), rng, 20)
    bg2 = _rgb(np.asarray(bg1) * rng.uniform(0.55, 1.0), rng, 20)
    return Identity(
        seed=int(seed),
        face_width=float(rng.uniform(0.27, 0.33)), face_height=float(rng.uniform(0.355, 0.39)),
        jaw_taper=float(rng.uniform(0.0, 1.0)),
        skin_tone=tone, skin=_rgb(SKIN_TONES[tone], rng, 8),
        eye_spacing=float(rng.uniform(0.118, 0.142)), eye_width=float(rng.uniform(0.046, 0.056)),
        eye_open=float(rng.uniform(0.85, 1.15)), eye_tilt=float(rng.uniform(-0.006, 0.008)),
        eye_color_name=eye_name, eye_color=_rgb(EYE_COLORS[eye_name], rng, 10),
        brow_thickness=float(rng.uniform(0.016, 0.028)), brow_arch=float(rng.uniform(0.006, 0.016)),
        nose_size=float(rng.uniform(0.85, 1.25)),
        mouth_width=float(rng.uniform(0.075, 0.095)), lip_thickness=float(rng.uniform(0.85, 1.25)),
        hair_style=style, hair_color_name=hair_name, hair_color=_rgb(HAIR_COLORS[hair_name], rng, 10),
        glasses=str(rng.choice(GLASSES, p=[.72, .14, .14])),
        glasses_color=_rgb(rng.choice([(20, 20, 24), (90, 60, 40), (170, 150, 90), (120, 30, 40)]), rng, 10),
        facial_hair=facial, age=age,
        background=bg1, background2=bg2, background_angle=float(rng.uniform(0, 2 * np.pi)),
        clothes=_rgb(rng.integers(30, 230, 3), rng, 0),
    )


def split_identities(split: str, count: int) -> list[Identity]:
    """The identity pool of a split: seeds [offset, offset + count), disjoint across splits."""
    if split not in SPLIT_OFFSET:
        raise ValueError(f"split must be one of {', '.join(SPLIT_OFFSET)}, got {split!r}")
    if not 0 < count <= MAX_IDENTITIES:
        raise ValueError(f"count must be in 1..{MAX_IDENTITIES}, got {count}")
    return [sample_identity(SPLIT_OFFSET[split] + k) for k in range(count)]


def sample_expression_aus(expression: str, rng: np.random.Generator, extra_rate: float = 0.08) -> np.ndarray:
    """AU vector for `expression`: FAU-FE prototype AUs at varied intensity plus weak distractors.

    Distractor AUs switch on at `extra_rate` each, so classes overlap as real ones do
    (fear vs surprise share 1, 2, 5, 26; disgust vs anger share lowered brows).
    """
    return L.AUPrior(extra_rate=extra_rate).sample(expression, rng)


# ---------------------------------------------------------------- geometry (batched)

_EY, _NY, _MY = -0.035, 0.085, 0.195  # eye line, nostrils, mouth line (face units, y down)


def _ellipse(cx, cy, rx, ry, n=18):
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    cx, cy, rx, ry = (np.asarray(v, dtype=np.float64).reshape(-1, 1) for v in (cx, cy, rx, ry))
    return np.stack(np.broadcast_arrays(cx + rx * np.cos(a), cy + ry * np.sin(a)), -1)


def _pts(x, y):
    return np.stack(np.broadcast_arrays(x, y), -1)


def _band(x, top, bottom):
    """Polygon between two curves sampled at the same x (left to right)."""
    return np.concatenate([_pts(x, top), _pts(x, bottom)[:, ::-1]], axis=1)


def _shade(color, amount):
    """Darken (N,3) or (3,) `color` by `amount` (N,) in [0,1]."""
    return np.asarray(color, dtype=np.float64) * (1 - 0.5 * np.clip(np.asarray(amount), 0, 1))[..., None]


def _mix(a, b, w):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a + (b - a) * np.asarray(w, dtype=np.float64)[..., None]


class _Ops:
    """The draw list of a batch: (kind, points (N,P,2) in face units, colour (N,3), width, mask)."""

    def __init__(self, n):
        self.n, self.items = n, []

    def add(self, kind, pts, color, width=0.0, mask=None):
        color = np.broadcast_to(np.asarray(color, dtype=np.float64), (self.n, 3))
        pts = np.broadcast_to(pts, (self.n,) + pts.shape[-2:])
        mask = np.ones(self.n, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), (self.n,))
        self.items.append((kind, pts, color, width, mask))

    def poly(self, pts, color, mask=None):
        self.add("poly", pts, color, 0.0, mask)

    def line(self, pts, color, width, mask=None):
        self.add("line", pts, color, width, mask)


def _identity_arrays(identities: Sequence[Identity]) -> dict[str, np.ndarray]:
    fields = [f for f in Identity.__dataclass_fields__ if f not in ("skin_tone", "eye_color_name", "hair_color_name")]
    return {f: np.array([getattr(i, f) for i in identities]) for f in fields}


def _build_ops(A: dict[int, np.ndarray], I: dict[str, np.ndarray], side: np.ndarray) -> _Ops:
    n = len(side)
    ops = _Ops(n)
    def col(v):  # (N,3) colours
        return np.asarray(v, dtype=np.float64).reshape(n, -1)

    def c(v):  # (N,) or scalar -> (N,1), to broadcast against curve parameters
        return np.broadcast_to(np.asarray(v, dtype=np.float64), (n,))[:, None]
    skin, hair = col(I["skin"]), col(I["hair_color"])
    fw, fh, es, ew, ns = I["face_width"], I["face_height"], I["eye_spacing"], I["eye_width"], I["nose_size"]
    wr = np.clip((I["age"] - 0.35) * 1.5, 0, 1)  # wrinkle strength from age
    style, facial = I["hair_style"], I["facial_hair"]
    line_w = 0.0075

    # Mouth parameters per side (sigma = -1 left, +1 right); AU14 draws AU12 to its side.
    a14 = A[14]
    pull = np.clip(1.6 * a14, 0, 1)
    a12 = {s: np.where(side == s, np.clip(A[12] + 0.5 * a14, 0, 1), A[12] * (1 - pull)) for s in (-1, 1)}
    d14 = {s: np.where(side == s, a14, 0.0) for s in (-1, 1)}
    cdy = {s: -0.06 * a12[s] + 0.05 * A[15] + 0.008 * A[20] - 0.012 * d14[s] for s in (-1, 1)}
    mw = {s: I["mouth_width"] * (1 + 0.22 * a12[s] + 0.45 * A[20] - 0.18 * A[23] - 0.22 * A[26] * (1 - A[20])
                                 + 0.12 * d14[s] + 0.06 * A[10]) for s in (-1, 1)}
    smile = np.minimum(a12[-1], a12[1])
    jaw = 0.13 * A[26]  # lower face stretch of the jaw drop

    # --- hair behind the head
    long_back = np.isin(style, ("long", "bob"))
    back_len = np.where(style == "long", 0.62, 0.26)
    bw = fw + np.where(style == "long", 0.075, 0.06)
    t = np.linspace(0, np.pi, 16)
    top = _pts(c(bw) * -np.cos(t), -c(fh + 0.05) * np.sin(t) - 0.02)
    back = np.concatenate([top, _pts(c(bw) * np.array([1.0, 0.96, -0.96, -1.0]), c(back_len) * np.array([0.6, 1, 1, 0.6]))], 1)
    ops.poly(back, hair * 0.82, long_back)
    # --- neck, shoulders, ears
    ops.poly(_pts(c(fw) * np.array([-0.42, 0.42, 0.5, -0.5]), np.array([0.15, 0.15, 0.62, 0.62])), skin * 0.86)
    ops.poly(_ellipse(0.0, 0.72, fw * 2.1, 0.22, 20), col(I["clothes"]))
    for s in (-1, 1):
        ops.poly(_ellipse(s * fw * 0.97, _EY + 0.045, 0.032, 0.058, 12), skin * 0.9)
    # --- face outline (the jaw drop lengthens the lower face)
    a = np.linspace(0, 2 * np.pi, 44, endpoint=False)
    y = c(fh) * np.sin(a)
    low = np.clip(y / c(fh), 0, None)
    x = c(fw) * np.cos(a) * (1 - 0.32 * c(I["jaw_taper"]) * low ** 2 - 0.08 * low ** 4)
    ops.poly(_pts(x, y * (1 + c(jaw) * (y > 0))), skin)

    # --- cheeks (AU6 raises and rounds them), age and AU furrows
    for s in (-1, 1):
        ops.poly(_ellipse(s * (es + 0.01), _EY + 0.1 - 0.018 * A[6], 0.05, 0.034 + 0.006 * A[6], 14),
                 _mix(skin, (214, 96, 96), 0.32 * A[6]), A[6] > 0.05)
    tt = np.linspace(-1, 1, 9)
    for k in range(3):  # forehead lines: AU1/AU2 (and age)
        d = np.clip(np.maximum(0.75 * np.maximum(A[1], A[2]) - 0.1, 0.45 * wr), 0, 1)
        yy = _EY - 0.15 - 0.024 * k - 0.02 * c(A[2]) * tt ** 2 + 0.012 * c(A[1]) * tt ** 2
        ops.line(_pts(0.11 * tt * (1 - 0.15 * k), yy), _shade(skin, d), line_w * 0.8, d > 0.08)
    for s in (-1, 1):  # glabella lines: AU4
        ops.line(_pts(np.array([s * 0.012, s * 0.015]), np.array([_EY - 0.085, _EY - 0.04])), _shade(skin, A[4]), line_w * 0.8, A[4] > 0.08)
    d9 = np.clip(A[9] * 1.1, 0, 1)
    for k in range(3):  # nose wrinkles: AU9
        yy = _EY + 0.03 + 0.014 * k
        ops.line(_pts(np.array([-0.022, 0, 0.022]), np.array([yy + 0.006, yy, yy + 0.006])), _shade(skin, d9), line_w * 0.8, A[9] > 0.08)
    for s in (-1, 1):  # nasolabial folds: AU10, AU12, AU9, age
        d = np.clip(0.7 * a12[s] + 0.75 * A[10] + 0.45 * A[9] + 0.45 * wr, 0, 1)
        u = np.linspace(0, 1, 8)
        x0, y0 = s * 0.042 * ns, _NY - 0.012
        x1, y1 = s * (mw[s] + 0.014), _MY + cdy[s] + 0.02
        xx = c(x0) + (c(x1) - c(x0)) * u + s * 0.018 * np.sin(np.pi * u)
        ops.line(_pts(xx, c(y0) + (c(y1) - c(y0)) * u), _shade(skin, d), line_w, d > 0.1)
        ex0 = s * (es + ew + 0.006)  # crow's feet: AU6, age
        d = np.clip(np.maximum(0.9 * A[6], 0.6 * wr), 0, 1)
        for ang in (-0.45, 0.0, 0.45):
            ops.line(_pts(c(ex0) + s * np.array([0, 0.026 * math.cos(ang)]), _EY + np.array([0, 0.026 * math.sin(ang)])),
                     _shade(skin, d), line_w * 0.7, d > 0.1)
        d = np.clip(0.9 * A[6] + 0.5 * wr, 0, 1)  # infraorbital furrow: AU6 lifts the cheek to the eye
        uu = np.linspace(-1, 1, 7)
        ops.line(_pts(c(s * es) + c(ew) * uu, _EY + 0.045 - 0.008 * c(A[6]) + 0.008 * uu ** 2), _shade(skin, d), line_w * 0.8, d > 0.1)
    d = np.clip(A[14] * 1.2, 0, 1)  # dimple on the AU14 side
    xd = np.where(side < 0, -mw[-1], mw[1]) + side * 0.012
    yd = _MY + np.where(side < 0, cdy[-1], cdy[1])
    ops.line(_pts(c(xd) + c(side) * 0.004 * np.array([1, 0, 1]), c(yd) + np.array([-0.016, 0, 0.016])), _shade(skin, d), line_w, d > 0.08)
    chin = fh * (1 + jaw)
    ops.line(_pts(0.032 * tt, c(chin - 0.05) + 0.01 * tt ** 2 - 0.004), _shade(skin, A[17]), line_w, A[17] > 0.08)

    # --- facial hair under the mouth
    bmask = np.isin(facial, ("beard", "stubble"))
    b_col = np.where((facial == "stubble")[:, None], _mix(skin, (70, 60, 56), 0.28), hair * 0.9)
    a2 = np.linspace(-0.12, np.pi + 0.12, 20)
    low = np.clip(np.sin(a2), 0, None)
    yb = c(fh) * np.sin(a2) * (1 + c(jaw) * (np.sin(a2) > 0)) * 1.03
    xb = c(fw) * np.cos(a2) * (1 - 0.32 * c(I["jaw_taper"]) * low ** 2 - 0.08 * low ** 4) * 1.03
    ux = np.array([-0.86, -0.6, -0.25, 0.25, 0.6, 0.86])  # upper edge: sideburn, cheek, under the nose
    uy = np.array([0.0, 0.08, _NY + 0.035, _NY + 0.035, 0.08, 0.0])
    beard = np.concatenate([_pts(xb, yb), _pts(c(fw) * ux, uy + np.zeros((n, 1)))], 1)
    ops.poly(beard, b_col, bmask)

    # --- eyes: sclera, iris, lids drawn over, lid lines
    te = np.linspace(-1, 1, 13)
    uh0 = c(ew * 0.55 * I["eye_open"])
    uh = np.clip(uh0 + c(0.036 * A[5] - 0.012 * A[7] - 0.01 * A[6] - 0.005 * A[4]), 0.004, None)
    lh = np.clip(c(ew * 0.36 * I["eye_open"]) + c(0.008 * A[5] - 0.011 * A[7] - 0.014 * A[6] - 0.005 * A[9]), 0.002, None)
    ir = c(ew * 0.44)
    for s in (-1, 1):
        ex = c(s * es)
        x = ex + c(ew) * te
        tilt = -c(I["eye_tilt"]) * te * s
        yu = _EY + tilt - uh * (1 - te ** 2) ** 0.75 * (1 - 0.12 * te * s)
        yl = _EY + tilt + lh * (1 - te ** 2) ** 0.9
        ops.poly(_band(x, yu, yl), (238, 234, 228))
        ops.poly(_ellipse(ex[:, 0], _EY + 0.002, ir[:, 0], ir[:, 0], 14), col(I["eye_color"]))
        ops.poly(_ellipse(ex[:, 0], _EY + 0.002, ir[:, 0] * 0.45, ir[:, 0] * 0.45, 10), (12, 10, 10))
        ops.poly(_band(x, np.minimum(yu, _EY - ir - 0.006), yu), skin)
        ops.poly(_band(x, yl, np.maximum(yl, _EY + ir + 0.006)), skin)
        ops.line(_pts(x, yu), _mix(skin, (24, 16, 16), 0.85), 0.011)
        ops.line(_pts(x[:, 1:-1], yl[:, 1:-1]), _shade(skin, 0.45), 0.006)

    # --- brows: AU1 inner up, AU2 outer up, AU4 down and knit, AU9 pulls the inner end down
    brow = np.where(((style == "none") | (hair.sum(1) > 500))[:, None], (70, 52, 40), hair * 0.85)  # bald or white hair: dark brows
    tb = np.linspace(0, 1, 9)
    base = _EY - 0.078
    y_in = c(base - 0.075 * A[1] + 0.045 * A[4] - 0.012 * A[2] + 0.018 * A[9])
    y_out = c(base - 0.06 * A[2] - 0.012 * A[1] + 0.006 * A[4] + 0.006 * A[9])
    arch = c(I["brow_arch"] * np.clip(1 + 1.3 * A[2] - 0.8 * A[4] - 0.6 * A[1] * (1 - A[2]), 0.1, None))
    th = c(I["brow_thickness"]) * (1.15 - 0.45 * tb) / 2
    for s in (-1, 1):
        x = s * (c(es - ew - 0.004 - 0.022 * A[4]) + c(2 * ew + 0.02 + 0.022 * A[4]) * tb)
        yb = y_in + (y_out - y_in) * tb - arch * np.sin(np.pi * tb ** 0.8)
        ops.poly(_band(x, yb - th, yb + th), brow)

    # --- nose: wings, nostrils (AU9 flares and lifts them), bridge shade
    lift = 0.012 * A[9] + 0.004 * A[10]
    for s in (-1, 1):
        ops.poly(_ellipse(s * 0.019 * ns * (1 + 0.3 * A[9]), _NY - lift, 0.01 * ns, 0.0055 * ns, 10), _shade(skin, 0.75))
        aw = np.linspace(-1.7, 1.4, 7)
        ops.line(_pts(c(s * 0.03 * ns * (1 + 0.3 * A[9])) + s * c(0.014 * ns) * np.cos(aw), c(_NY - 0.01 - lift) + c(0.014 * ns) * np.sin(aw)),
                 _shade(skin, 0.4), line_w)
    ops.line(_pts(np.array([-0.012, -0.018]), c(np.zeros(n)) + np.array([_EY + 0.035, _NY - 0.025])), _shade(skin, 0.25), line_w)

    # --- mouth: lips, line of closure, opening, teeth
    tm = np.linspace(-1, 1, 21)
    left = tm < 0
    cd = np.where(left, c(cdy[-1]), c(cdy[1]))
    mwp = np.where(left, c(mw[-1]), c(mw[1]))
    x = mwp * tm
    y_mid = c(_MY + 0.012 * A[26]) + cd * np.abs(tm) ** 1.8 - 0.016 * c(A[17]) * (1 - tm ** 2)
    close = 1 - 0.85 * A[23]
    g_up = c((0.005 * A[25] + 0.014 * A[26] + 0.012 * np.clip(smile - 0.45, 0, None) / 0.55) * close)
    g10 = c(0.024 * A[10] * close)
    g_dn = c((0.007 * A[25] + 0.06 * A[26] + 0.01 * np.clip(smile - 0.45, 0, None) / 0.55) * close * (1 - 0.5 * A[17]))
    flat = c(2 + 5 * A[20])
    prof = np.clip(1 - np.abs(tm) ** flat, 0, 1) ** 0.5
    prof10 = np.clip(1 - np.abs(tm) ** 4, 0, 1) ** 0.5
    in_up = y_mid - g_up * prof - g10 * prof10
    in_dn = y_mid + g_dn * prof
    lt = I["lip_thickness"]
    th_up = c(0.016 * lt * np.clip(1 - 0.65 * A[23] - 0.35 * A[20] - 0.3 * smile - 0.3 * A[10], 0.15, None))
    th_dn = c(0.021 * lt * np.clip(1 - 0.65 * A[23] - 0.35 * A[20] - 0.25 * smile + 0.25 * A[17], 0.15, None))
    out_up = in_up - th_up * (1 - tm ** 2) ** 0.5 * (1 - 0.3 * np.exp(-(tm / 0.16) ** 2))
    out_dn = in_dn + th_dn * (1 - tm ** 2) ** 0.6
    lip = _mix(skin * np.array([0.86, 0.6, 0.6]), (170, 60, 70), 0.35)
    # a moustache sits on the upper lip and follows it
    ops.poly(_band(x * 1.08, out_up - 0.022, out_up + 0.002), hair * 0.9, facial == "moustache")
    ops.poly(_band(x * 1.08, out_up - 0.014, out_up + 0.002), hair * 0.9, facial == "beard")
    ops.poly(_band(x, out_up, out_dn), lip)
    ops.line(_pts(x, y_mid), _shade(lip, 0.75), 0.008)
    opened = (g_up + g_dn + g10)[:, 0] > 0.004
    ops.poly(_band(x, in_up, in_dn), (70, 18, 24), opened)
    ops.poly(_band(x, in_up, np.minimum(in_up + 0.014, in_dn)), (240, 236, 226), opened)
    ops.poly(_band(x * 0.92, np.maximum(in_dn - 0.011, in_up + 0.014), in_dn), (224, 220, 210), opened & (A[20] * A[26] > 0.12))

    # --- hair in front: a cap with a hairline above the brows, or a bun on top
    cap = style != "none"
    hl = c(np.where(style == "fringe", -0.245, np.where(style == "short", -0.285, -0.27)))
    vol = c(np.where(style == "short", 0.022, 0.035))
    temple = c(np.where(style == "short", -0.1, -0.05))
    a3 = np.linspace(np.pi, 2 * np.pi, 20)
    top_y = c(-fh - 0.012) - vol
    outer = _pts(c(fw + 0.008) * (1 + vol * 1.2) * np.cos(a3), temple + (top_y - temple) * np.clip(-np.sin(a3), 0, 1) ** 0.7)
    xs = np.linspace(1, -1, 13)
    hairline = _pts(c(fw * 1.01) * xs, hl + (temple - hl) * np.abs(xs) ** 2.2)
    ops.poly(np.concatenate([outer, hairline], 1), hair, cap)
    ops.poly(_ellipse(0.0, -fh - 0.055, 0.075, 0.06, 14), hair, style == "bun")

    # --- glasses
    g = I["glasses"]
    gc = col(I["glasses_color"])
    for s in (-1, 1):
        rx, ry = c(ew + 0.026), 0.045
        ops.line(_ellipse(s * es, _EY + 0.004, rx[:, 0], ry, 20)[:, list(range(20)) + [0]], gc, 0.009, g == "round")
        sq = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [-1, -1]], float)
        ops.line(_pts(c(s * es) + rx * sq[:, 0] * 1.05, _EY + 0.004 + ry * 0.85 * sq[:, 1]), gc, 0.009, g == "square")
        ops.line(_pts(c(s * (es + ew + 0.026)) + s * np.array([0, 1]) * c(fw - es - ew - 0.026), _EY - 0.01 + np.zeros(2)), gc, 0.008, g != "none")
    ops.line(_pts(c(es - ew - 0.026) * np.array([-1, -0.5, 0.5, 1]), _EY - 0.006 + np.array([0, -0.008, -0.008, 0])), gc, 0.008, g != "none")
    return ops


# ---------------------------------------------------------------- raster


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
        r = np.random.default_rng([int(sd), 0x9E])
        pose[i] = (r.uniform(-0.11, 0.11), r.uniform(-0.03, 0.03), r.uniform(-0.02, 0.03), r.uniform(0.94, 1.05),
                   r.uniform(0, 2 * np.pi), r.uniform(0.05, 0.3), r.uniform(1.0, 3.5), r.choice([-1, 1]), 0)
    A = {au: aus[:, k] for k, au in enumerate(L.AU_IDS)}
    I = _identity_arrays(identities)
    ops = _build_ops(A, I, pose[:, 7])

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
        r = np.random.default_rng([int(sd), 0x40])
        img[i] += r.standard_normal((size, size, 3), dtype=np.float32) * np.float32(pose[i, 6])
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_face(aus, identity: Identity, size: int = 64, seed: int = 0):
    """One face as a PIL image; `aus` is an AU vector (16,) or a {'AU6': 0.8, ...} dict."""
    from PIL import Image

    vec = L.au_vector(aus) if isinstance(aus, dict) else np.asarray(aus, dtype=np.float64)
    return Image.fromarray(render_faces(vec[None], [identity], size, [seed])[0])


# ---------------------------------------------------------------- the Source plugin


class ProceduralSource(Source):
    """Faces of the procedural world with ground-truth expression, AUs and identity."""

    name = "procedural"

    class Config(StageConfig):
        num_images: int = Field(1000, gt=0)
        size: int = Field(64, ge=16, le=1024)  # pixels (square)
        seed: int = 0  # picks expressions, identities, AUs and poses per image index
        split: Literal["train", "test"] = "train"  # identity pools of the splits are disjoint
        num_identities: int = Field(200, gt=0, le=MAX_IDENTITIES)
        expressions: list[str] | dict[str, float] | None = None  # mix (names or name->weight); default: the label space
        label_space: str = "affectnet8"
        extra_au_rate: float = Field(0.08, ge=0, le=1)  # chance of each weak distractor AU
        batch_size: int = Field(256, gt=0)  # render batch (memory vs speed only; output is identical)

        @field_validator("label_space")
        @classmethod
        def _space(cls, v):
            L.label_space(v)
            return v

        @model_validator(mode="after")
        def _mix_in_space(self):
            space = L.label_space(self.label_space)
            names = list(self.expressions or [])
            bad = [e for e in names if L.ALIASES.get(e.strip().lower()) not in space]
            if bad:
                raise ValueError(f"expressions {bad} are not in label space {self.label_space!r} ({', '.join(space)})")
            if isinstance(self.expressions, dict) and (min(self.expressions.values()) < 0 or sum(self.expressions.values()) <= 0):
                raise ValueError(f"expression weights must be >= 0 with a positive sum, got {self.expressions}")
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


def identity_id(identity: Identity) -> str:
    split = "test" if identity.seed >= SPLIT_OFFSET["test"] else "train"
    return f"proc-{split}-{identity.seed - SPLIT_OFFSET[split]:06d}"


# ---------------------------------------------------------------- preview


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


@hookimpl
def register_stages(register):
    register(ProceduralSource)
