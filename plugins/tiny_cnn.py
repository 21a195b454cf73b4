"""The project's own small FER classifier (`tiny-cnn`) and AU detector (`au-cnn`).

Trained on procedural FEText by `synfer train classifier` / `synfer train au-detector`.
One trunk serves three roles: the guidance classifier of semantic guidance (Eq. 5,
differentiable from image to logits), a voting expert, and, trained separately on other
identities with another seed, the independent oracle that judges generated images and
the feature extractor of the offline FID. Weights: `model.safetensors` + `config.json`.
"""
from __future__ import annotations

import json
from pathlib import Path

from synfer.engine.arrays import load_arrays  # noqa: F401  (moved to the core; kept importable here)
from synfer.engine.checkpoints import load_state
from synfer import hookimpl
from synfer import labels as L
from synfer.stages import AUDetector, GuidanceClassifier, StageConfig, TrainableClassifier, missing_path

MODELS = Path(__file__).parent / "models"


def build_net(num_outputs: int, width: int = 32, size: int = 64):
    """A small VGG-style CNN; `features()` gives the penultimate (pooled) features."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def block(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class TinyFERNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.size = size
            w = width
            self.trunk = nn.Sequential(
                block(3, w // 2, 2),                       # 32
                block(w // 2, w), nn.MaxPool2d(2),         # 16
                block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8
                block(2 * w, 4 * w), block(4 * w, 4 * w),  # 8
            )
            self.drop = nn.Dropout(0.2)
            self.head = nn.Linear(4 * w, num_outputs)

        def prepare(self, x):
            """RGB in [-1, 1], any size -> the net's input size (differentiable)."""
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > self.size)
            return x

        def features(self, x):
            return self.trunk(self.prepare(x)).mean(dim=(2, 3))

        def forward(self, x):
            return self.head(self.drop(self.features(x)))

    return TinyFERNet()


def save_net(net, folder: str | Path, config: dict) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_net(folder: str | Path, device: str = "cpu"):
    """-> (net in eval mode, config dict). Clear error when the folder is not a trained model."""

    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder} holds no trained tiny CNN (expected config.json and model.safetensors). "
                                f"Train one with 'synfer train classifier --data FETEXT --out {folder}'.")
    cfg = json.loads((folder / "config.json").read_text())
    net = build_net(cfg["num_outputs"], cfg.get("width", 32), cfg.get("size", 64))
    load_state(net, folder / "model.safetensors", folder / "model.safetensors",
               f"Its config.json says {cfg}; retrain with 'synfer train classifier' (or 'au-detector') or point to the right folder.")
    return net.to(device).eval(), cfg


def _cached_net(stage):
    """Load a stage's net on first use (validating a recipe never reads weights), frozen:
    guidance moves the text embedding and judges only predict, so no weight needs a gradient."""
    if getattr(stage, "_net", None) is None:
        stage._net, stage._net_cfg = load_net(stage.config.weights or MODELS / stage.default_folder, stage.config.device)
        stage._net.requires_grad_(False)
    return stage._net, stage._net_cfg


class _WeightsFolder:
    """The small CNN stages' shared check: `weights`, if set, must be a model folder."""

    train_command: str
    weights_path = property(lambda self: self.config.weights or MODELS / self.default_folder)

    @classmethod
    def problems(cls, config):
        return missing_path(config, "weights", "a folder with config.json and model.safetensors",
                            f"Train one with 'synfer train {cls.train_command} --data FETEXT --out FOLDER', or leave it unset for the shipped model.")


class TinyCNN(_WeightsFolder, GuidanceClassifier, TrainableClassifier):
    """Guidance classifier / expert on the project's small CNN (label space from its config.json)."""

    name = "tiny-cnn"
    licence = "MIT (synfer's own, trained on its procedural faces)"

    class Config(StageConfig):
        weights: str | None = None  # model folder; None = the shipped `tiny-cnn`
        device: str = "cpu"

    default_folder = "tiny-cnn"
    train_command = "classifier"

    @classmethod
    def fit_arrays(cls, images, targets, num_classes, *, iters, batch_size, lr, seed, size, width, threads=None):
        """A fresh net of this architecture trained on arrays (the downstream benchmark); -> images -> logits."""
        import torch

        torch.manual_seed(seed)
        net = build_net(num_classes, width, size)
        fit(net, images, targets, task="classify", iters=iters, batch_size=batch_size, lr=lr, seed=seed, log_interval=iters, threads=threads)
        return lambda x: predict_logits(net, x)

    @property
    def label_space(self) -> str:
        """Read from the weights' config.json before any weight loads: a net trained on fer2013 guides in fer2013."""
        if getattr(self, "_space", None) is None:
            folder = Path(self.config.weights or MODELS / self.default_folder)
            if not (folder / "config.json").exists():
                raise FileNotFoundError(f"{folder} holds no config.json, so {self.name} cannot tell its label space; "
                                        f"train a model with 'synfer train {self.train_command} --data FETEXT --out {folder}'")
            self._space = json.loads((folder / "config.json").read_text()).get("label_space", "affectnet8")
        return self._space

    @property
    def net(self):
        return _cached_net(self)[0]

    def forward(self, images):
        net = self.net
        return net(images.to(self.config.device))

    def features(self, images):
        return self.net.features(images.to(self.config.device))


class OracleCNN(TinyCNN):
    """The independent judge of the procedural world: same architecture, other identities and seed."""

    name = "oracle-cnn"
    default_folder = "oracle-cnn"


class AUCNN(_WeightsFolder, AUDetector):
    """Multi-label AU intensity regressor (sigmoid outputs, intensities in [0, 1])."""

    name = "au-cnn"
    licence = "MIT (synfer's own, trained on its procedural faces)"

    class Config(StageConfig):
        weights: str | None = None  # model folder; None = the shipped `au-cnn`
        device: str = "cpu"
        batch_size: int = 256

    default_folder = "au-cnn"
    train_command = "au-detector"

    @property
    def net(self):
        return _cached_net(self)[0]

    def predict_images(self, images) -> "np.ndarray":
        """PIL images -> (N, len(AU_KEYS)) intensities."""
        import numpy as np
        import torch

        out = []
        for i in range(0, len(images), self.config.batch_size):
            x = images_to_tensor(images[i:i + self.config.batch_size]).to(self.config.device)
            with torch.no_grad():
                out.append(torch.sigmoid(self.net(x)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(L.AU_KEYS)), np.float32)

    def detect(self, records):
        return [L.au_dict(v) for v in self.predict_images([r.image for r in records])]


def images_to_tensor(images):
    """PIL images (same size) -> float tensor (N, 3, H, W) in [-1, 1]."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def augment(x, gen):
    """Train-time jitter: small shifts, brightness/contrast, and half the batch seen at 32x32 and
    back, so the classifier also judges the blurrier images of a 32x32 generator."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    shift = torch.randint(-3, 4, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    gain = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    bias = 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    x = (x * gain + bias).clamp(-1, 1)
    low = torch.rand(n, generator=gen) < 0.5
    if low.any() and x.shape[-1] > 32:
        small = F.interpolate(x[low], size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        x[low] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x


def _wrapper(net, task: str, pos_weight=None):
    """The net as an mmengine BaseModel: forward(image, target, mode='loss') -> {'loss': ...}."""
    import torch
    import torch.nn.functional as F
    from mmengine.model import BaseModel

    class FERTrainModel(BaseModel):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, image, target, mode="loss"):
            # the augmentation's generator comes from the global RNG, which run_training seeds per (seed, iteration):
            # a resumed run augments exactly as an uninterrupted one
            gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 62, (1,))))
            x = augment(image.float() / 127.5 - 1.0, gen)
            out = self.net(x)
            if task == "classify":
                return {"loss": F.cross_entropy(out, target, label_smoothing=0.05)}
            return {"loss": F.binary_cross_entropy_with_logits(out, target.float(), pos_weight=pos_weight)}

    return FERTrainModel()


class ArrayDataset:
    """uint8 images (N,H,W,3) + targets as a torch map-style dataset of dicts."""

    def __init__(self, images, targets):
        import numpy as np
        import torch

        self.x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.t = torch.as_tensor(np.asarray(targets))

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return {"image": self.x[i], "target": self.t[i]}


def fit(net, images, targets, task: str = "classify", iters: int = 1500, batch_size: int = 64, lr: float = 2e-3,
        seed: int = 0, work_dir=None, resume: bool = False, log_interval: int = 100, checkpoint_interval: int | None = None,
        threads: int | None = None):
    """Train `net` in place on uint8 images (N,H,W,3) through synfer.engine.training.run_training (mmengine Runner).
    task: 'classify' (int targets, cross-entropy) or 'au' (intensities in [0,1], BCE). Returns [(iter, loss)]."""
    import tempfile

    from synfer.engine.training import run_training

    import numpy as np
    import torch

    # (a positive weight for rare AUs was tried: AU25 F1 0.0 -> 0.10 but mean F1 0.837 -> 0.812, so plain BCE)
    pos_weight = None
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="synfer-fit-")
        work_dir = tmp.name
    try:
        result = run_training(_wrapper(net, task, pos_weight), ArrayDataset(images, targets), work_dir=work_dir, max_iters=iters,
                              batch_size=batch_size, lr=lr, weight_decay=1e-4, warmup_iters=max(1, iters // 20),
                              seed=seed, resume=resume, log_interval=log_interval,
                              checkpoint_interval=checkpoint_interval, keep_checkpoints=2, threads=threads,
                              name=f"tiny-cnn-{task}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    net.eval()
    return result.losses


def train_from_folder(data, out, task: str = "classify", label_space: str = "affectnet8", iters: int = 2000,
                      batch_size: int = 64, lr: float = 2e-3, seed: int = 0, width: int = 32, size: int = 64,
                      work_dir=None, resume: bool = False, limit: int | None = None, test=None, checkpoint_interval: int | None = None):
    """Train a tiny CNN on a FEText folder and save it; with `test`, report held-out numbers.
    Checkpoints every `checkpoint_interval` iterations (default min(500, iters)) in OUT/work; `resume`
    continues from the newest intact one and ends with the weights of an uninterrupted run."""
    import numpy as np

    x, y, aus, _ = load_arrays(data, label_space, size=size, limit=limit)
    from synfer.engine.training import seed_everything

    outputs = len(L.label_space(label_space)) if task == "classify" else len(L.AU_KEYS)
    seed_everything(seed)  # the initial weights follow --seed too
    net = build_net(outputs, width=width, size=size)
    losses = fit(net, x, y if task == "classify" else aus, task, iters=iters, batch_size=batch_size, lr=lr, seed=seed,
                 work_dir=work_dir or Path(out) / "work", resume=resume, checkpoint_interval=checkpoint_interval)
    cfg = {"num_outputs": outputs, "width": width, "size": size, "task": task, "label_space": label_space,
           "trained_on": str(data), "iters": iters, "seed": seed, "train_images": int(len(x))}
    metrics = {}
    if test is not None:
        metrics = evaluate_net(net, test, task, label_space, size)
        cfg["heldout"] = metrics
    save_net(net, out, cfg)
    return net, losses, metrics


def evaluate_net(net, test, task: str, label_space: str = "affectnet8", size: int = 64) -> dict:
    """Held-out numbers: accuracy + UAR for a classifier, per-AU F1 (binarised at AU_ON_THRESHOLD) for AUs."""
    import numpy as np

    x, y, aus, _ = load_arrays(test, label_space, size=size)
    logits = predict_logits(net, x)
    if task == "classify":
        from synfer.engine.scoring import classification_scores

        return {**classification_scores(y, logits.argmax(1)), "n": int(len(y))}
    from synfer.engine.scoring import au_f1_scores

    scores = au_f1_scores(aus, 1 / (1 + np.exp(-logits)), undefined=0.0)  # an AU absent from the test set scores 0
    return {"au_f1_mean": scores["au_f1"], "au_f1": {k: scores[f"au_f1_{k}"] for k in L.AU_KEYS}, "n": int(len(aus))}


def predict_logits(net, images, batch_size: int = 256):
    """uint8 images (N,H,W,3) -> logits (N, outputs) as numpy, no grad."""
    import numpy as np
    import torch

    out = []
    device = next(net.parameters()).device  # the training Runner leaves the net on the GPU when there is one
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            out.append(net(x.to(device)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


@hookimpl
def register_stages(register):
    register(TinyCNN)
    register(OracleCNN)
    register(AUCNN)


@hookimpl
def register_commands(cli):
    from synfer_plugins.tiny_cnn_commands import add_commands

    add_commands(cli.subgroup("train"))
