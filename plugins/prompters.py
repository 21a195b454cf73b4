"""Prompter plugins: enrich "a photo of a {expression} person" into a detailed prompt (paper Fig. 2)."""
from __future__ import annotations

import numpy as np

from synfer import hookimpl
from synfer import labels as L
from synfer.stages import Prompter, SampleRequest, StageConfig

COARSE = "a photo of a {expression} person"

# Appearance and context phrases; the wording follows the template captioner so the
# tiny model's word-level tokenizer knows every word.
APPEARANCE = ("a young person", "a middle aged person", "an older person", "a person with short hair",
              "a person with long hair", "a person with glasses", "a bald person", "a person with a beard")
CONTEXT = ("plain background", "soft lighting", "frontal portrait", "studio photo", "close up face")
EMOTION_WORDS = {
    "neutral": "calm neutral", "happy": "happy joyful", "sad": "sad unhappy", "surprise": "surprised astonished",
    "fear": "fearful scared", "disgust": "disgusted", "anger": "angry furious", "contempt": "contemptuous",
}


def describe_aus(aus: dict[str, float], threshold: float = 0.3) -> list[str]:
    """Muscle movements in FACS words for the AUs above `threshold`, strongest first."""
    active = sorted(((v, k) for k, v in aus.items() if v >= threshold), reverse=True)
    return [L.AU_NAMES[int(k[2:])] for _, k in active]


class TemplatePrompter(Prompter):
    """Deterministic per sample seed: appearance + muscle movements + context around the emotion."""

    name = "template"

    class Config(StageConfig):
        mention_aus: bool = True  # describe the sample's AU vector in FACS words
        max_aus: int = 4

    def prompt(self, requests: list[SampleRequest]) -> list[str]:
        out = []
        for r in requests:
            rng = np.random.default_rng([r.seed, 7])
            parts = [f"a photo of {APPEARANCE[rng.integers(len(APPEARANCE))]}",
                     f"with a {EMOTION_WORDS[r.expression]} expression"]
            if self.config.mention_aus:
                moves = describe_aus(r.aus)[: self.config.max_aus]
                if moves:
                    parts.append("showing " + ", ".join(moves))
            parts.append(CONTEXT[rng.integers(len(CONTEXT))])
            out.append(", ".join(parts))
        return out


@hookimpl
def register_stages(register):
    register(TemplatePrompter)
