"""An example third-party synfer plugin: a guidance classifier and an expert.

Installing this package is all it takes: the `synfer` entry point below makes both
show up in `synfer plugins` and usable from any recipe.

    [project.entry-points.synfer]
    example = "synfer_example"
"""
from __future__ import annotations

from typing import Literal

from synfer import hookimpl
from synfer.stages import Expert, GuidanceClassifier, StageConfig


class SmileGuidance(GuidanceClassifier):
    """Differentiable toy classifier: the brightness of the lower face is the 'happy' evidence."""

    name = "example-smile"
    label_space = "fer2013"

    class Config(StageConfig):
        sharpness: float = 4.0

    def forward(self, images):
        import torch

        lower = images[:, :, images.shape[2] // 2:, :].mean(dim=(1, 2, 3))
        logits = torch.zeros(images.shape[0], 7, dtype=images.dtype, device=images.device)
        happy = 3  # fer2013 order: anger, disgust, fear, happy, sad, surprise, neutral
        return logits.index_add(1, torch.tensor([happy], device=images.device), (self.config.sharpness * lower)[:, None])


class ConstantExpert(Expert):
    """An expert that always votes for one class (a 7-class space: it cannot see contempt)."""

    name = "example-constant"
    label_space = "fer2013"

    class Config(StageConfig):
        vote_for: Literal["anger", "disgust", "fear", "happy", "sad", "surprise", "neutral"] = "neutral"
        confidence: float = 0.9

    def predict(self, images):
        import numpy as np

        from synfer.labels import label_space

        classes = label_space(self.label_space)
        p = np.full((len(images), len(classes)), (1 - self.config.confidence) / (len(classes) - 1))
        p[:, classes.index(self.config.vote_for)] = self.config.confidence
        return p


@hookimpl
def register_stages(register):
    register(SmileGuidance)
    register(ConstantExpert)
