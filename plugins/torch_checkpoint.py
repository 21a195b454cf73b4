"""Any local torch FER classifier as a guidance classifier (and so an expert): "torch-checkpoint".

Three ways in, all local files (no hub):
- a `torch.export` program (`torch.export.save`, `.pt2`; export it with a dynamic batch
  dimension and in eval mode, which the program keeps): `path` alone;
- a TorchScript file (`torch.jit.save`): `path` alone;
- a state dict (`.safetensors`, or `.pt`/`.pth` read with `weights_only=True`) plus the
  class to build it into: `module: "pkg.mod:ClassName"` and its `kwargs`.
The config says how the model wants its input (`size`, `grey`, `mean`, `std` on [0, 1]
images) and what its outputs mean (`label_space`, optionally `classes` in output order).
Weights load on first use, so validating a recipe never needs the file.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pydantic import field_validator, model_validator

from synfer.engine.checkpoints import load_state
from synfer import hookimpl
from synfer.labels import LABEL_SPACES, canonical
from synfer.stages import GuidanceClassifier, StageConfig, missing_path


class TorchCheckpoint(GuidanceClassifier):
    """A local TorchScript file or state dict + class, with declared preprocessing and classes.

    `forward` takes RGB (N, 3, H, W) in [-1, 1] at any size and returns logits in
    `label_space` order, differentiable back to the image.
    """

    name = "torch-checkpoint"
    licence = "MIT (code; the checkpoint has its own licence, declared in its folder's README.md)"
    # label_space is per instance: a property reading the config (below).

    class Config(StageConfig):
        path: str  # torch.export .pt2 or TorchScript file; a state dict (.safetensors / .pt) when `module` is set
        module: str | None = None  # "pkg.mod:ClassName" to build before loading a state dict
        kwargs: dict[str, Any] = {}  # keyword arguments for that class
        key: str | None = None  # entry of a .pt checkpoint dict holding the state dict (e.g. "state_dict")
        strict: bool = True  # load_state_dict(strict=...)
        label_space: str  # a synfer label space (see 'synfer labels'): the classes logits are returned in
        classes: list[str] | None = None  # the model's output order if it differs from label_space (any spelling)
        size: int | tuple[int, int] | None = None  # resize to (H, W) (or square) before the model; None: as given
        grey: bool = False  # ITU-R 601 luma, one channel
        mean: list[float] = [0.0]  # per channel (or one value), on [0, 1] images
        std: list[float] = [1.0]
        device: str = "cpu"

        @field_validator("label_space")
        @classmethod
        def _known_space(cls, v: str) -> str:
            if v not in LABEL_SPACES:
                raise ValueError(f"no label space {v!r}; known: {', '.join(LABEL_SPACES)}")
            return v

        @field_validator("module")
        @classmethod
        def _module_syntax(cls, v: str | None) -> str | None:
            if v is not None and (v.count(":") != 1 or not all(v.split(":"))):
                raise ValueError(f"module must look like 'pkg.mod:ClassName', got {v!r}")
            return v

        @field_validator("classes")
        @classmethod
        def _canonical_classes(cls, v: list[str] | None) -> list[str] | None:
            if v is None:
                return v
            out = [canonical(c) for c in v]
            if len(set(out)) != len(out):
                raise ValueError(f"classes name one expression twice: {v}")
            return out

        @field_validator("std")
        @classmethod
        def _nonzero_std(cls, v: list[float]) -> list[float]:
            if any(s == 0 for s in v):
                raise ValueError(f"std must not contain 0, got {v}")
            return v

        @model_validator(mode="after")
        def _consistent(self):
            if self.classes is not None:
                missing = [c for c in LABEL_SPACES[self.label_space] if c not in self.classes]
                if missing:
                    raise ValueError(f"classes {self.classes} lack {missing} of label space {self.label_space!r} "
                                     f"({', '.join(LABEL_SPACES[self.label_space])}); pick a label space the model covers")
            channels = 1 if self.grey else 3
            for field in ("mean", "std"):
                if len(getattr(self, field)) not in (1, channels):
                    raise ValueError(f"{field} has {len(getattr(self, field))} values; expected 1 or {channels}")
            if self.module is None and self.path.endswith(".safetensors"):
                raise ValueError(f"{self.path} holds only weights: set module: 'pkg.mod:ClassName' (and kwargs) to build the model")
            return self

    @classmethod
    def problems(cls, config):
        return missing_path(config, "path", "a TorchScript/.pt2 file or a state dict (.safetensors/.pt)",
                            "Point guidance_classifier.path (or the expert's path) at a local checkpoint; nothing is downloaded.")

    def __init__(self, config: StageConfig | None = None):
        if config is None:
            raise ValueError("torch-checkpoint needs a config: at least `path` and `label_space`")
        super().__init__(config)
        self._model = None
        self._order = None  # output indices in label_space order, when `classes` is given

    @property
    def label_space(self) -> str:
        return self.config.label_space  # the space comes from the recipe

    # ------------------------------------------------------------ loading
    @property
    def model(self):
        if self._model is None:  # first use: recipes validate without loading weights
            model = self._load()
            if not Path(self.config.path).suffix == ".pt2":  # an exported program keeps its export-time mode
                model.eval()
            for p in model.parameters():
                p.requires_grad_(False)  # guidance differentiates w.r.t. the image only
            self._model = model
        return self._model

    def _load(self):
        import torch

        c = self.config
        path = Path(c.path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"torch-checkpoint: no file at {path} (config `path`)")
        if c.module is None and path.suffix == ".pt2":
            return torch.export.load(str(path)).module().to(c.device)
        if c.module is None:
            try:
                return torch.jit.load(str(path), map_location=c.device)
            except RuntimeError as exc:
                raise RuntimeError(f"torch-checkpoint: {path} is not a TorchScript file ({exc}). A torch.export program must be "
                                   f"named *.pt2; for a state dict set module: 'pkg.mod:ClassName' (and kwargs).") from exc
        mod_name, cls_name = c.module.split(":")
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError) as exc:
            raise ImportError(f"torch-checkpoint: cannot import {c.module!r} ({exc}); is its package installed?") from exc
        model = cls(**c.kwargs)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        if c.key is not None:
            if not isinstance(state, dict) or c.key not in state:
                keys = ", ".join(map(str, list(state)[:10])) if isinstance(state, dict) else type(state).__name__
                raise KeyError(f"torch-checkpoint: {path} has no entry {c.key!r} (it has: {keys})")
            state = state[c.key]
        load_state(model, state, path, f"Check that module={c.module!r} with kwargs={c.kwargs} is the class this checkpoint was "
                   "saved from (or set key: to the entry holding its state dict).", strict=c.strict)
        return model.to(c.device)

    # ------------------------------------------------------------ forward
    def forward(self, images):
        import torch
        import torch.nn.functional as F

        c = self.config
        model = self.model
        x = (images.to(c.device).float() + 1.0) / 2.0  # [-1, 1] -> [0, 1], the range mean/std refer to
        if c.grey and x.shape[1] == 3:
            r, g, b = x.unbind(1)
            x = (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)
        if c.size is not None:
            size = (c.size, c.size) if isinstance(c.size, int) else tuple(c.size)
            if tuple(x.shape[-2:]) != size:
                down = x.shape[-2] > size[0] or x.shape[-1] > size[1]
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)
        mean = torch.tensor(c.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(c.std, device=x.device).view(1, -1, 1, 1)
        out = model((x - mean) / std)
        if isinstance(out, dict):
            out = out["logits"]
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return self._to_label_space(out)

    def _to_label_space(self, logits):
        c = self.config
        space = LABEL_SPACES[c.label_space]
        expected = len(c.classes) if c.classes is not None else len(space)
        if logits.shape[-1] != expected:
            raise ValueError(f"torch-checkpoint: the model gives {logits.shape[-1]} outputs but "
                             f"{'classes lists' if c.classes is not None else f'label space {c.label_space!r} has'} {expected}; "
                             f"set `classes` to the model's output order")
        if c.classes is None:
            return logits
        if self._order is None:
            import torch

            self._order = torch.tensor([c.classes.index(name) for name in space], device=logits.device)
        return logits.index_select(-1, self._order.to(logits.device))


@hookimpl
def register_stages(register):
    register(TorchCheckpoint)
