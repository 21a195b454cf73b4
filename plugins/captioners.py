"""Captioners of FEText (paper 4.2.1): a caption per face, focused on its expression.

`template` writes captions in the paper's MLLM style (appearance, then the muscle
movements of the active AUs in FACS words, then the emotion) from what a record already
knows: the procedural identity in `attributes`, its AUs and its expression. It needs no
model, is deterministic per record, and keeps a modest vocabulary so a word-level
tokenizer trained on the captions stays small.

A model-backed captioner (an MLLM given the paper's expression-focused instruction)
belongs in its own class next to this one: subclass `Captioner`, set `name`, nest a
strict `Config`, and add it to `register_stages` at the bottom.
"""
from __future__ import annotations

import re
import zlib

import numpy as np
from pydantic import Field

from synfer import hookimpl
from synfer import labels as L
from synfer.stages import Captioner, FaceRecord, StageConfig

# Emotion wording per canonical expression: (adjectives, nouns).
EMOTION_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "neutral": (("neutral", "calm", "relaxed"), ("a neutral expression", "a calm, relaxed look")),
    "happy": (("happy", "joyful", "cheerful"), ("happiness", "joy")),
    "sad": (("sad", "unhappy", "sorrowful"), ("sadness", "sorrow")),
    "surprise": (("surprised", "astonished", "amazed"), ("surprise", "astonishment")),
    "fear": (("fearful", "scared", "afraid"), ("fear", "alarm")),
    "disgust": (("disgusted", "repulsed"), ("disgust", "distaste")),
    "anger": (("angry", "furious", "annoyed"), ("anger", "rage")),
    "contempt": (("contemptuous", "scornful", "dismissive"), ("contempt", "scorn")),
}

# What each AU does, in plain words (FACS names come from synfer.labels.AU_NAMES).
AU_PHRASES: dict[int, str] = {
    1: "the inner brows are raised", 2: "the outer brows are raised", 4: "the brows are lowered and drawn together",
    5: "the upper lids are raised", 6: "the cheeks are raised", 7: "the lids are tightened",
    9: "the nose is wrinkled", 10: "the upper lip is raised", 12: "the lip corners are pulled up",
    14: "a dimple shows at one mouth corner", 15: "the lip corners are pulled down", 17: "the chin is raised",
    20: "the lips are stretched", 23: "the lips are tightened", 25: "the lips are parted", 26: "the jaw is dropped",
}
AGE_WORDS = ((0.3, "young"), (0.55, "adult"), (0.75, "middle-aged"), (1.01, "elderly"))


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _record_seed(record: FaceRecord, salt: int) -> int:
    """Same record -> same caption, wherever it sits in a batch (the image stands in for a missing identity)."""
    key = f"{record.identity}|{record.expression}|{sorted((record.aus or {}).items())}".encode()
    if record.identity is None and record.image is not None:
        key += record.image.tobytes()
    return zlib.crc32(key) ^ (salt & 0xFFFFFFFF)


# The identity attributes a record may carry (the procedural world's); a real photo's record carries none of them
# (its `file` says where it came from, not what the person looks like), so its caption describes no appearance.
APPEARANCE_KEYS = ("age", "hair_style", "hair_color_name", "facial_hair", "glasses", "eye_color_name", "skin_tone")


def appearance(attrs: dict, rng: np.random.Generator) -> str:
    """'A young man with short brown hair, a beard and round glasses, fair skin'; only what `attrs` says."""
    if not any(k in (attrs or {}) for k in APPEARANCE_KEYS):
        return _pick(rng, ("A face", "A close-up of a face", "A portrait of a person"))
    if "age" not in attrs or "hair_style" not in attrs:  # partly known: say only what is (never a default bald head)
        return _partial_appearance(attrs, rng)
    age = next(w for cut, w in AGE_WORDS if attrs["age"] < cut)
    subject = "man" if attrs.get("facial_hair") in ("beard", "moustache") else "person"
    bits = []
    style, colour = attrs.get("hair_style", "none"), attrs.get("hair_color_name", "")
    if style == "none":
        bits.append("a bald head")
    else:
        shape = {"short": "short", "long": "long", "bob": "chin-length", "bun": "tied-up", "fringe": "short"}[style]
        bits.append(f"{shape} {colour} hair" + (" with a fringe" if style == "fringe" else "") + (" in a bun" if style == "bun" else ""))
    if attrs.get("facial_hair", "none") != "none":
        bits.append({"stubble": "stubble", "moustache": "a moustache", "beard": "a beard"}[attrs["facial_hair"]])
    if attrs.get("glasses", "none") != "none":
        bits.append(f"{attrs['glasses']} glasses")
    if attrs.get("eye_color_name") and rng.random() < 0.5:
        bits.append(f"{attrs['eye_color_name']} eyes")
    if attrs.get("skin_tone"):
        bits.append(f"{attrs['skin_tone']} skin")
    joined = ", ".join(bits[:-1]) + (" and " if len(bits) > 1 else "") + bits[-1]
    lead = _pick(rng, ("", "A photo of ", "A portrait of ", "A close-up of "))
    who = f"{lead}{_a(age)} {subject}"
    return f"{who[0].upper()}{who[1:]} with {joined}"


def _partial_appearance(attrs: dict, rng: np.random.Generator) -> str:
    bits = [f"{attrs['hair_color_name']} hair"] if attrs.get("hair_color_name") else []
    if attrs.get("facial_hair") in ("stubble", "moustache", "beard"):
        bits.append({"stubble": "stubble", "moustache": "a moustache", "beard": "a beard"}[attrs["facial_hair"]])
    if attrs.get("glasses") not in (None, "none"):
        bits.append(f"{attrs['glasses']} glasses")
    for key, noun in (("eye_color_name", "eyes"), ("skin_tone", "skin")):
        if attrs.get(key):
            bits.append(f"{attrs[key]} {noun}")
    age = next((w for cut, w in AGE_WORDS if attrs["age"] < cut), None) if "age" in attrs else None
    who = f"A portrait of {_a(age)} person" if age else "A portrait of a person"
    return f"{who} with {_join(bits)}" if bits else who


def movements(aus: dict[str, float] | None, rng: np.random.Generator, threshold: float = 0.3, most: int = 4) -> list[str]:
    """The strongest active AUs as muscle movements, e.g. ['the brows are lowered and drawn together', ...]."""
    vec = L.au_vector(aus)
    order = [i for i in np.argsort(-vec, kind="stable") if vec[i] >= threshold][:most]
    named = int(rng.integers(-1, len(order))) if order else -1  # at most one phrase also gives the FACS name
    words = []
    for k, i in enumerate(order):
        au = L.AU_IDS[i]
        strength = "slightly " if vec[i] < 0.5 else "strongly " if vec[i] > 0.85 and rng.random() < 0.5 else ""
        phrase = AU_PHRASES[au]
        for verb in (" are ", " is "):
            if strength and verb in phrase:
                phrase = phrase.replace(verb, f"{verb}{strength}", 1)
                break
        words.append(phrase + (f" ({L.AU_NAMES[au]})" if k == named else ""))
    return words


def _join(items: list[str]) -> str:
    return ", ".join(items[:-1]) + (" and " if len(items) > 1 else "") + items[-1]


MAX_WORDS = 60


def template_caption(record: FaceRecord, seed: int, au_threshold: float = 0.3, max_movements: int = 4) -> str:
    """Appearance, muscle movements of the active AUs, then the emotion (paper 4.2.1 caption style).

    Movements are dropped from the weakest up until the caption fits MAX_WORDS.
    """
    rng = np.random.default_rng(seed)
    head = appearance(record.attributes, rng) + "."
    moves = movements(record.aus, rng, au_threshold, max_movements)
    lead = _pick(rng, ("In the face, ", "", "The face shows that "))
    tail = ""
    if record.expression:
        canon = L.canonical(record.expression)
        adj, nouns = EMOTION_WORDS[canon]
        adj_w = _pick(rng, adj)
        tail = _pick(rng, (
            f"The person looks {adj_w}.",
            f"The expression shows {_pick(rng, nouns)}.",
            f"The facial expression is {canon}, the person appears {adj_w}.",
            f"{_a(adj_w).capitalize()} face, expression: {canon}.",
        ))
        if not re.search(rf"\b{canon}\b", tail):  # the label word itself always appears
            tail += f" Expression: {canon}."
    while True:
        middle = (lead + _join(moves) + ".") if moves else ""
        text = " ".join(p[0].upper() + p[1:] for p in (head, middle, tail) if p)
        if len(text.split()) <= MAX_WORDS or not moves:
            return text
        moves = moves[:-1]


class TemplateCaptioner(Captioner):
    """Captions from a record's attributes, AUs and expression (no model, deterministic)."""

    name = "template"
    licence = "MIT (synfer's own templates; no weights)"

    class Config(StageConfig):
        seed: int = 0  # changes the phrasing, not the content
        au_threshold: float = Field(0.3, ge=0, le=1)  # AUs at or above this intensity are described
        max_movements: int = Field(4, ge=0, le=16)

    def caption(self, records: list[FaceRecord]) -> list[str]:
        cfg = self.config
        return [template_caption(r, _record_seed(r, cfg.seed), cfg.au_threshold, cfg.max_movements) for r in records]


@hookimpl
def register_stages(register):
    register(TemplateCaptioner)
