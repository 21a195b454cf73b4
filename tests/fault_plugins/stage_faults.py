"""Stages of issue 40's table that register fine and then break the contract where the core calls them."""
import os
import signal
import sys
import time

import numpy as np
from PIL import ImageOps

from fault_plugins import Plain, uniform
from synfer import hookimpl
from pydantic import model_validator

from synfer.stages import Evaluator, Expert, GuidanceClassifier, StageConfig


def happy(n):
    p = np.full((n, 8), 0.004)
    p[:, 1] = 0.972  # happy
    return p


class ExitInInit(Plain, Expert):
    name = "fault-exit-init"

    def __init__(self, config=None):
        super().__init__(config)
        sys.exit(3)  # "no GPU, give up"

    def predict(self, images):
        return uniform(images)


class ExitInConfig(Plain, Expert):
    name = "fault-exit-config"

    class Config(StageConfig):
        device: str = "cuda"

        @model_validator(mode="after")
        def _gpu(self):
            sys.exit(4)  # "this plugin needs a GPU"

    def predict(self, images):
        return uniform(images)


class ExitInPredict(Plain, Expert):
    name = "fault-exit-predict"

    def predict(self, images):
        sys.exit()


class RaisesInterrupt(Plain, Expert):
    name = "fault-raise-interrupt"

    def predict(self, images):
        raise KeyboardInterrupt  # used as "stop", no key was pressed


class CtrlC(Plain, Expert):
    """What a user's Ctrl-C looks like from inside a plugin: a real SIGINT while predict() runs (on its `at`-th call)."""

    name = "fault-ctrl-c"
    calls = 0
    at = 1

    def predict(self, images):
        type(self).calls += 1
        if type(self).calls >= type(self).at:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler interrupts the sleep
        return uniform(images)


class Equalize(Plain, Expert):
    """Equalises the images it is given in place (PIL's paste), then votes happy."""

    name = "fault-equalize"

    def predict(self, images):
        for im in images:
            im.paste(ImageOps.equalize(im))
        return happy(len(images))


class SoftmaxedLogits(Plain, Expert):
    """Declares logits, returns probabilities: the core would softmax twice (0.972 -> 0.273)."""

    name = "fault-softmaxed"
    outputs = "logits"

    def predict(self, images):
        return happy(len(images))


class GradTensor(Plain, Expert):
    """Returns the torch tensor its model produced: requires_grad, float16."""

    name = "fault-grad-tensor"

    def predict(self, images):
        import torch

        w = torch.ones(1, requires_grad=True)
        return (torch.from_numpy(happy(len(images))) * w).half()


class MetaExpert(Plain, Expert):
    name = "fault-meta-expert"

    def predict(self, images):
        import torch

        return torch.empty(len(images), 8, device="meta")


class NoSuper(Plain, Expert):
    """An __init__ that forgets super().__init__(config)."""

    name = "fault-no-super"

    def __init__(self, config=None):
        self.threshold = 0.5

    def predict(self, images):
        return uniform(images)


class _Guidance(Plain, GuidanceClassifier):
    def logits(self, images):
        import torch

        return images.mean(dim=(1, 2, 3))[:, None] * torch.arange(8.0, device=images.device)


class NaNLogits(_Guidance):
    name = "fault-nan-logits"

    def forward(self, images):
        return self.logits(images) * float("nan")


class Rounds(_Guidance):
    """Quantises its input as its training data was (torch.round has a zero gradient)."""

    name = "fault-rounds"

    def forward(self, images):
        return self.logits(images.mul(127.5).round().div(127.5))


class MetaLogits(_Guidance):
    name = "fault-meta-logits"

    def forward(self, images):
        import torch

        return torch.empty(len(images), 8, device="meta", requires_grad=True)


class InPlace(_Guidance):
    """Normalises its input in place."""

    name = "fault-inplace"

    def forward(self, images):
        images.mul_(0.5).add_(0.25)
        return self.logits(images)


class WritesDataset(Evaluator):
    """'Fixes' the first image of the dataset it measures."""

    name = "fault-writes-dataset"

    class Config(Plain.Config):
        pass

    def evaluate(self, dataset, reference=None):
        first = sorted((dataset / "images").iterdir())[0]
        first.write_bytes(first.read_bytes() + b"\0")
        return {"fixed": 1.0}


@hookimpl
def register_stages(register):
    for cls in (ExitInInit, ExitInConfig, ExitInPredict, RaisesInterrupt, CtrlC, Equalize, SoftmaxedLogits, GradTensor, MetaExpert, NoSuper,
                NaNLogits, Rounds, MetaLogits, InPlace, WritesDataset):
        register(cls)
