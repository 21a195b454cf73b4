"""Two more real FER classifiers from PyPI wheels, each a guidance classifier and an expert.

`pyemotion`: the CNN of `PyEmotion==1.0.0` (MIT; `synfer models fetch pyemotion`): 4 conv blocks
(reflection pad, 3x3 conv, BatchNorm, ReLU; 32-256 channels), FC 9216-256-7 and a final
sigmoid, trained on FER2013 (48 x 48 grey, (g/255 - 0.5) / 0.5). The module below has the
wheel's parameter names, so its state dict loads as is. Logits = the input of the sigmoid
(monotone in it, so the softmax ranks classes as the package does).

`facex`: facex==1.1.0's Keras MobileNetV2 (MIT; `synfer models fetch facex`), a TFLite file with
weight-only int8 quantisation, run by synfer_plugins.tflite_torch. Input 200 x 200, grey
replicated to 3 channels, in [0, 1]; its classes [anger, disgust, fear, happy, neutral, sadness,
surprised] are permuted into FER2013 order, so both experts speak the "fer2013" label space.

Both take RGB (N, 3, H, W) in [-1, 1] at any size, grey it (ITU-R 601 luma, as cv2 does),
resize and scale it themselves: gradients reach the image. Weights load on first use.
"""
from __future__ import annotations

from pathlib import Path

from synfer import hookimpl
from synfer.engine.fetch import default_path
from synfer.stages import GuidanceClassifier, StageConfig

FACEX_CLASSES = ("anger", "disgust", "fear", "happy", "neutral", "sad", "surprise")


def build_pyemotion(state: dict | None = None):
    """PyEmotion's NetworkV2(in_c=1, nl=32, out_f=7) minus the final sigmoid; `state` loaded strictly."""
    from torch import nn

    def block(i, o, stride):
        return nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(i, o, 3, stride, 0), nn.BatchNorm2d(o), nn.ReLU())

    class PyEmotionCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_1, self.conv_2 = block(1, 32, 1), block(32, 64, 2)
            self.conv_3, self.conv_4 = block(64, 128, 2), block(128, 256, 2)
            self.linear = nn.Sequential(nn.Linear(256 * 6 * 6, 256), nn.ReLU(), nn.Linear(256, 7))  # the sigmoid is left out

        def forward(self, x):
            x = self.conv_4(self.conv_3(self.conv_2(self.conv_1(x))))
            return self.linear(x.reshape(x.shape[0], -1))

    net = PyEmotionCNN()
    if state is not None:
        net.load_state_dict(state, strict=True)
    return net.eval()


def _resized(x, size: int):
    """(N, C, H, W) -> (N, C, size, size), bilinear (antialiased when shrinking), differentiably."""
    import torch.nn.functional as F

    if x.shape[-2:] != (size, size):
        down = x.shape[-2] > size or x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
    return x


def _grey_resized(images, size: int):
    """RGB [-1, 1] (N, 3, H, W) -> luma (N, 1, size, size) in [-1, 1], differentiably."""
    x = images.float()
    if x.shape[1] == 3:
        r, g, b = x.unbind(1)
        x = (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)
    return _resized(x, size)


class _WheelExpert(GuidanceClassifier):
    label_space = "fer2013"
    asset: str
    weights_path = property(lambda self: self.config.weights or default_path(self.asset))

    class Config(StageConfig):
        weights: str | None = None  # the model file; None: the cache filled by 'synfer models fetch <name>'
        device: str = "cpu"

    @classmethod
    def problems(cls, config):
        from synfer.engine.fetch import weights_problems

        return weights_problems(config.weights, cls.asset)

    def __init__(self, config=None):
        super().__init__(config)
        self._model = None

    def _path(self) -> Path:
        from synfer.engine.fetch import weights_file

        return weights_file(self.config.weights, self.asset, self.name)

    @property
    def model(self):
        if self._model is None:  # first use: recipes validate without weights
            model = self._build(self._path()).to(self.config.device)
            for p in model.parameters():
                p.requires_grad_(False)
            self._model = model
        return self._model


class PyEmotionClassifier(_WheelExpert):
    """PyEmotion's FER2013 CNN (48 x 48 grey): logits in "fer2013" order."""

    name = "pyemotion"
    licence = "MIT (PyEmotion 1.0.0's weights, trained on FER2013)"
    asset = "pyemotion"
    size = 48

    def _build(self, path):
        import torch

        return build_pyemotion(torch.load(path, map_location="cpu", weights_only=True)["network"])

    def forward(self, images):
        model = self.model
        return model(_grey_resized(images.to(self.config.device), self.size))  # [-1, 1] is the model's (g/255-0.5)/0.5


class FacexClassifier(_WheelExpert):
    """facex's MobileNetV2 (200 x 200, grey replicated, [0, 1]): logits permuted into "fer2013" order."""

    name = "facex"
    licence = "MIT (facex 1.1.0's weights)"
    asset = "facex"
    size = 200

    def _build(self, path):
        from synfer_plugins.tflite_torch import build_tflite_graph

        return build_tflite_graph(path, logits=True)

    def forward(self, images):
        from synfer.labels import LABEL_SPACES

        model = self.model
        x = (_grey_resized(images.to(self.config.device), self.size) + 1.0) / 2.0
        logits = model(x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1))  # NHWC, as in the file
        return logits[:, [FACEX_CLASSES.index(c) for c in LABEL_SPACES["fer2013"]]]


@hookimpl
def register_stages(register):
    register(PyEmotionClassifier)
    register(FacexClassifier)
