"""Face parts: the draw list of a batch of faces, one function per part of the face.

Each AU of synfer.labels.AU_IDS moves what a FACS coder expects (brows for 1/2/4, lids for
5/6/7, nose for 9, lips for 10-26), exaggerated so that the eight AffectNet classes read at
64x64. Geometry is computed for the whole batch with numpy, in face units (x right, y down,
origin at the face centre); `raster.render_faces` poses and draws it. The parts are drawn in
the order of `PARTS` (later parts cover earlier ones); that order and every constant here fix
the pixels of every procedural face (the shipped models were trained on them).

AU14 (dimpler) is drawn on one side (picked by the seed) and draws the lip-corner pull of AU12
toward that side, so the contempt prototype 12 + 14 renders as a unilateral smirk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from synfer_plugins.procedural.identity import Identity

# ---------------------------------------------------------------- geometry helpers

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


class Ops:
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


def identity_arrays(identities: Sequence[Identity]) -> dict[str, np.ndarray]:
    fields = [f for f in Identity.__dataclass_fields__ if f not in ("skin_tone", "eye_color_name", "hair_color_name")]
    return {f: np.array([getattr(i, f) for i in identities]) for f in fields}


@dataclass
class FaceParams:
    """What every part of a batch reads: AUs, identity arrays, the AU14 side, and the mouth
    geometry shared by the furrows and the lips (per side: sigma = -1 left, +1 right)."""

    n: int
    A: dict[int, np.ndarray]  # AU id -> (N,) intensity
    I: dict[str, np.ndarray]  # identity field -> (N, ...) array  # noqa: E741
    side: np.ndarray  # (N,) -1 or +1: the side of AU14
    skin: np.ndarray
    hair: np.ndarray
    fw: np.ndarray
    fh: np.ndarray
    es: np.ndarray
    ew: np.ndarray
    ns: np.ndarray
    wr: np.ndarray  # wrinkle strength from age
    style: np.ndarray
    facial: np.ndarray
    a12: dict[int, np.ndarray]  # lip-corner pull per side (AU14 draws AU12 to its side)
    d14: dict[int, np.ndarray]
    cdy: dict[int, np.ndarray]  # mouth-corner lift per side
    mw: dict[int, np.ndarray]  # mouth half-width per side
    smile: np.ndarray
    jaw: np.ndarray  # lower face stretch of the jaw drop
    line_w: float = 0.0075

    def col(self, v):  # (N,3) colours
        return np.asarray(v, dtype=np.float64).reshape(self.n, -1)

    def c(self, v):  # (N,) or scalar -> (N,1), to broadcast against curve parameters
        return np.broadcast_to(np.asarray(v, dtype=np.float64), (self.n,))[:, None]


def face_params(A: dict[int, np.ndarray], I: dict[str, np.ndarray], side: np.ndarray) -> FaceParams:  # noqa: E741
    n = len(side)
    col = lambda v: np.asarray(v, dtype=np.float64).reshape(n, -1)  # noqa: E731
    # Mouth parameters per side (sigma = -1 left, +1 right); AU14 draws AU12 to its side.
    a14 = A[14]
    pull = np.clip(1.6 * a14, 0, 1)
    a12 = {s: np.where(side == s, np.clip(A[12] + 0.5 * a14, 0, 1), A[12] * (1 - pull)) for s in (-1, 1)}
    d14 = {s: np.where(side == s, a14, 0.0) for s in (-1, 1)}
    cdy = {s: -0.06 * a12[s] + 0.05 * A[15] + 0.008 * A[20] - 0.012 * d14[s] for s in (-1, 1)}
    mw = {s: I["mouth_width"] * (1 + 0.22 * a12[s] + 0.45 * A[20] - 0.18 * A[23] - 0.22 * A[26] * (1 - A[20])
                                 + 0.12 * d14[s] + 0.06 * A[10]) for s in (-1, 1)}
    return FaceParams(
        n=n, A=A, I=I, side=side, skin=col(I["skin"]), hair=col(I["hair_color"]),
        fw=I["face_width"], fh=I["face_height"], es=I["eye_spacing"], ew=I["eye_width"], ns=I["nose_size"],
        wr=np.clip((I["age"] - 0.35) * 1.5, 0, 1), style=I["hair_style"], facial=I["facial_hair"],
        a12=a12, d14=d14, cdy=cdy, mw=mw, smile=np.minimum(a12[-1], a12[1]), jaw=0.13 * A[26])


# ---------------------------------------------------------------- the parts, back to front


def draw_head(ops: Ops, f: FaceParams) -> None:
    """Hair behind the head, neck, shoulders, ears and the face outline (the jaw drop of AU26 lengthens the lower face)."""
    I, c, col, skin, hair, fw, fh, style, jaw = f.I, f.c, f.col, f.skin, f.hair, f.fw, f.fh, f.style, f.jaw
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


def draw_furrows(ops: Ops, f: FaceParams) -> None:
    """Cheeks (AU6 raises and rounds them), age lines and the furrows of AUs 1/2, 4, 6, 9, 10, 12, 14, 17."""
    A, side, c, skin, fh, es, ew, ns, wr = f.A, f.side, f.c, f.skin, f.fh, f.es, f.ew, f.ns, f.wr
    line_w, a12, cdy, mw, jaw = f.line_w, f.a12, f.cdy, f.mw, f.jaw
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


def draw_facial_hair(ops: Ops, f: FaceParams) -> None:
    """Beard or stubble under the mouth."""
    n, I, c, skin, hair, fw, fh, facial, jaw = f.n, f.I, f.c, f.skin, f.hair, f.fw, f.fh, f.facial, f.jaw
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


def draw_eyes(ops: Ops, f: FaceParams) -> None:
    """Eyes: sclera, iris, lids drawn over (AU5 widens, AU6/AU7 narrow), lid lines."""
    A, I, c, col, skin, es, ew = f.A, f.I, f.c, f.col, f.skin, f.es, f.ew
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


def draw_brows(ops: Ops, f: FaceParams) -> None:
    """Brows: AU1 inner up, AU2 outer up, AU4 down and knit, AU9 pulls the inner end down."""
    A, I, c, hair, es, ew, style = f.A, f.I, f.c, f.hair, f.es, f.ew, f.style
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


def draw_nose(ops: Ops, f: FaceParams) -> None:
    """Nose: wings, nostrils (AU9 flares and lifts them), bridge shade."""
    n, A, c, skin, ns, line_w = f.n, f.A, f.c, f.skin, f.ns, f.line_w
    # --- nose: wings, nostrils (AU9 flares and lifts them), bridge shade
    lift = 0.012 * A[9] + 0.004 * A[10]
    for s in (-1, 1):
        ops.poly(_ellipse(s * 0.019 * ns * (1 + 0.3 * A[9]), _NY - lift, 0.01 * ns, 0.0055 * ns, 10), _shade(skin, 0.75))
        aw = np.linspace(-1.7, 1.4, 7)
        ops.line(_pts(c(s * 0.03 * ns * (1 + 0.3 * A[9])) + s * c(0.014 * ns) * np.cos(aw), c(_NY - 0.01 - lift) + c(0.014 * ns) * np.sin(aw)),
                 _shade(skin, 0.4), line_w)
    ops.line(_pts(np.array([-0.012, -0.018]), c(np.zeros(n)) + np.array([_EY + 0.035, _NY - 0.025])), _shade(skin, 0.25), line_w)


def draw_mouth(ops: Ops, f: FaceParams) -> None:
    """Mouth: lips, line of closure, opening, teeth (AUs 10, 12, 14, 15, 17, 20, 23, 25, 26); a moustache on the upper lip."""
    A, I, c, skin, hair, facial, cdy, mw, smile = f.A, f.I, f.c, f.skin, f.hair, f.facial, f.cdy, f.mw, f.smile
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


def draw_hair_front(ops: Ops, f: FaceParams) -> None:
    """Hair in front: a cap with a hairline above the brows, or a bun on top."""
    c, hair, fw, fh, style = f.c, f.hair, f.fw, f.fh, f.style
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


def draw_glasses(ops: Ops, f: FaceParams) -> None:
    """Glasses: round or square frames, temples and bridge."""
    I, c, col, fw, es, ew = f.I, f.c, f.col, f.fw, f.es, f.ew
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


PARTS = (draw_head, draw_furrows, draw_facial_hair, draw_eyes, draw_brows, draw_nose, draw_mouth, draw_hair_front, draw_glasses)


def build_ops(A: dict[int, np.ndarray], I: dict[str, np.ndarray], side: np.ndarray) -> Ops:  # noqa: E741
    """The draw list of a batch: every part of `PARTS`, in order."""
    f = face_params(A, I, side)
    ops = Ops(f.n)
    for part in PARTS:
        part(ops, f)
    return ops
