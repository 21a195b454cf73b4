"""Who is in the picture: the identity of a procedural face (shape, colours, hair, glasses,
age, background), drawn deterministically from one seed; the disjoint identity pools of the
train and test splits; and the AU vector of an expression (FAU-FE prior with distractors)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synfer import labels as L
from synfer.engine.seeds import stream_rng

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
    rng = stream_rng(seed, "procedural.identity")
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


def identity_id(identity: Identity) -> str:
    split = "test" if identity.seed >= SPLIT_OFFSET["test"] else "train"
    return f"proc-{split}-{identity.seed - SPLIT_OFFSET[split]:06d}"
