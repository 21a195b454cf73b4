"""Dummy stages for core tests: deterministic, torch-free, instant."""
from __future__ import annotations

import time

import numpy as np
from PIL import Image

from pydantic import Field

from synfer import hookimpl
from synfer import labels as L
from synfer.engine.resume import NOT_SAMPLES
from synfer.stages import Evaluator, Expert, GeneratedSample, Generator, GuidanceClassifier, StageConfig


class DummyGenerator(Generator):
    """Paints a per-seed noise image whose mean brightness encodes the preassigned class."""

    name = "dummy"

    class Config(StageConfig):
        batch_size: int = 4
        size: int = 16
        steps: int = 1
        delay: float = Field(0.0, json_schema_extra=NOT_SAMPLES)  # seconds per batch, so a test can kill a run half-way

    def generate(self, requests, guidance=None):
        if self.config.steps <= 0:
            raise ValueError("steps must be > 0")
        time.sleep(self.config.delay)
        out = []
        for r in requests:
            rng = np.random.default_rng(r.seed)
            level = L.EXPRESSIONS.index(r.expression) * 30
            px = np.clip(rng.integers(0, 20, (self.config.size, self.config.size, 3)) + level, 0, 255).astype(np.uint8)
            out.append(GeneratedSample(request=r, image=Image.fromarray(px), extra={"generator": self.name}))
        return out


class BrightnessExpert(Expert):
    """Reads the class back from brightness, but calls every 'sad' image 'neutral' (a wrong expert)."""

    name = "dummy-expert"
    label_space = "affectnet8"

    class Config(StageConfig):
        confuse_sad: bool = True

    def predict(self, images):
        classes = L.label_space(self.label_space)
        p = np.full((len(images), len(classes)), 0.01)
        for i, im in enumerate(images):
            name = L.EXPRESSIONS[min(int(round((np.asarray(im).mean() - 9.5) / 30)), len(L.EXPRESSIONS) - 1)]
            if self.config.confuse_sad and name == "sad":
                name = "neutral"
            p[i, classes.index(name)] = 1.0
        return p / p.sum(1, keepdims=True)


class CountEvaluator(Evaluator):
    name = "dummy-count"

    class Config(StageConfig):
        pass

    def evaluate(self, dataset, reference=None):
        from synfer.engine.dataset import read_metadata

        return {"count": float(len(read_metadata(dataset)))}


class NaNGuidance(GuidanceClassifier):
    """A broken guidance classifier: after `skip_calls` clean forward passes, the next `poison_calls`
    (all, if negative) return NaN logits (refused at the boundary, naming it), or, with poison "gradient",
    finite logits whose gradient is NaN, as a guidance step that diverges mid-run (the sample goes
    non-finite and the generator redraws it; only the first guided step's gradient is checked)."""

    name = "dummy-nan"
    label_space = "affectnet8"

    class Config(StageConfig):
        poison_calls: int = 1
        skip_calls: int = 0
        poison: str = "logits"  # or "gradient"

    def __init__(self, config=None):
        super().__init__(config)
        self.calls = 0

    def forward(self, images):
        import torch

        self.calls += 1
        logits = images.mean(dim=(2, 3))[:, :1].repeat(1, 8) * torch.arange(8.0)
        k = self.calls - self.config.skip_calls
        if k > 0 and (self.config.poison_calls < 0 or k <= self.config.poison_calls):
            if self.config.poison == "gradient":  # 0 * sqrt(0): the value 0, the derivative 0 * inf = NaN
                return logits + 0 * (images - images.detach()).flatten(1)[:, :1].sqrt()
            logits = logits * float("nan")
        return logits


@hookimpl
def register_stages(register):
    register(NaNGuidance)
    register(DummyGenerator)
    register(BrightnessExpert)
    register(CountEvaluator)
