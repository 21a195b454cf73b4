"""Plugins that register fine and then return the wrong thing (checked where the core calls them)."""
import numpy as np

from fault_plugins import Plain
from synfer import hookimpl
from synfer.stages import Expert, GuidanceClassifier


class _Expert(Plain, Expert):
    def probs(self, n):
        p = np.full((n, 8), 0.02)
        p[:, 1] = 0.86  # happy
        return p


class NaNExpert(_Expert):
    name = "fault-nan"

    def predict(self, images):
        p = self.probs(len(images))
        p[0, 0] = np.nan
        return p


class LogProbExpert(_Expert):
    name = "fault-logprob"

    def predict(self, images):
        return np.log(self.probs(len(images)))


class TransposedExpert(_Expert):
    name = "fault-transposed"

    def predict(self, images):
        return self.probs(len(images)).T


class LogitExpert(_Expert):
    """Declares logits: the core applies the softmax (documented, not a fault)."""

    name = "fault-declared-logits"
    outputs = "logits"

    def predict(self, images):
        return np.log(self.probs(len(images))) + 3.0


class _Guidance(Plain, GuidanceClassifier):
    def logits(self, images, classes=8):
        import torch

        return images.mean(dim=(1, 2, 3))[:, None] * torch.arange(float(classes))


class Fer2013Pattern(_Guidance):
    """The old tiny-cnn pattern: a ClassVar the plugin overwrites when its weights (trained on fer2013) load."""

    name = "fault-fer2013"

    def forward(self, images):
        self.label_space = "fer2013"
        return self.logits(images, 7)


class ProbGuidance(_Guidance):
    name = "fault-probs"

    def forward(self, images):
        return self.logits(images).softmax(-1)


class SevenOfEight(_Guidance):
    name = "fault-7of8"

    def forward(self, images):
        return self.logits(images, 7)


class Raising(_Guidance):
    name = "fault-raises"

    def forward(self, images):
        return images.reshape(len(images), -1) @ images.new_zeros(5, 8)  # a shape error deep inside torch


class Detached(_Guidance):
    name = "fault-detached"

    def forward(self, images):
        return self.logits(images).detach()


class SevenClass(_Guidance):
    """A 7-class classifier (no contempt): contempt samples are recorded as unguided."""

    name = "fault-7class"
    label_space = "fer2013"

    def forward(self, images):
        return self.logits(images, 7)


@hookimpl
def register_stages(register):
    for cls in (NaNExpert, LogProbExpert, TransposedExpert, LogitExpert, Fer2013Pattern, ProbGuidance, SevenOfEight, Raising,
                Detached, SevenClass):
        register(cls)
