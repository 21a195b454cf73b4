"""The `feranno` calibrator stage (paper 4.4, Fig. 4): a label calibrator reading the generator's own UNet.

capture.py takes what the UNet sees (decoder features + cross-attention maps at t=1),
encoder.py is the dual-branch encoder that reads them, train.py trains it on FEText.
This module imports torch only inside methods: registering it stays torch-free.
"""
from __future__ import annotations

from pathlib import Path

from synfer.stages import Calibrator, StageConfig, missing_path
from synfer_plugins.feranno.capture import condition_inputs, extract

MODELS = Path(__file__).parent.parent / "models"


class FERAnnoConfig(StageConfig):
    weights: str | None = None  # FERAnno folder (encoder + config); None: the shipped `feranno`
    device: str | None = None  # where the encoder runs; None: the generator's device
    t: int | None = None  # Eq. 1 timestep the image is noised to before the UNet pass; None: the one it was trained at
    condition: str | None = None  # generic | sample (see capture.condition_inputs); None: the one it was trained with
    generic_prompt: str = "a photo of a person"
    batch_size: int = 32


class FERAnno(Calibrator):
    """Diffusion-feature label calibrator (paper 4.4)."""

    name = "feranno"
    licence = "MIT (synfer's own, trained on its procedural faces)"
    weights_path = property(lambda self: Path(self.config.weights or MODELS / "feranno"))
    Config = FERAnnoConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.gen = None
        self._enc = None
        self._cfg = None

    @classmethod
    def problems(cls, config):
        return missing_path(config, "weights", "a FERAnno folder (config.json + model.safetensors)",
                            "Train one with 'synfer train calibrator --data FETEXT --model GENERATOR --out FOLDER'.")

    def bind(self, backbone) -> None:
        """The generator whose UNet FERAnno reads: anything with the DiffusionBackbone attributes (synfer.stages)."""
        from synfer.stages import DiffusionBackbone

        wanted = [n for n in (*DiffusionBackbone.__annotations__, "encode_image", "encode_text", "predict_noise")
                  if not hasattr(type(backbone), n) and n not in vars(backbone)]  # on the class: binding loads no weights
        if wanted:
            raise TypeError(f"calibrator 'feranno' reads a diffusion UNet, but the generator {type(backbone).__name__} lacks "
                            f"{', '.join(wanted)} (the DiffusionBackbone protocol in synfer.stages). Use the 'sd' generator, "
                            "or drop the calibrator from the recipe.")
        self.gen = backbone

    @property
    def label_space(self) -> str:
        """From the trained encoder's config.json, read before any weight loads (the core reads it first)."""
        if self._cfg is None:
            import json

            folder = Path(self.config.weights or MODELS / "feranno")
            if not (folder / "config.json").exists():
                raise FileNotFoundError(f"{folder} holds no trained FERAnno (config.json), so its label space is unknown. "
                                        f"Train one with 'synfer train calibrator --data FETEXT --model GENERATOR --out {folder}'.")
            return json.loads((folder / "config.json").read_text()).get("label_space", "affectnet8")
        return self._cfg["label_space"]

    @property
    def encoder(self):
        if self._enc is None:
            from synfer_plugins.feranno.encoder import load_encoder

            device = self.config.device or (str(self.gen.device) if self.gen is not None else "cpu")
            self._enc, self._cfg = load_encoder(self.config.weights or MODELS / "feranno", device)
        return self._enc

    def _read_as(self):
        """The stage config with t and condition filled in from the trained encoder where the recipe left them out:
        an encoder only reads captures taken the way it was trained."""
        _ = self.encoder
        return self.config.model_copy(update={"t": self.config.t if self.config.t is not None else self._cfg.get("t", 1),
                                              "condition": self.config.condition or self._cfg.get("condition", "generic")})

    def predict_tensors(self, images, prompts, aus, seeds):
        """images (N,3,H,W) in [-1,1] at the generator's size -> probabilities (N, classes)."""
        import torch

        if self.gen is None:
            raise RuntimeError("FERAnno needs the generator whose UNet it reads: call bind(generator) first "
                               "(synfer run does this from the recipe's generator block)")
        enc, cfg = self.encoder, self._read_as()
        dev = next(enc.parameters()).device
        out = []
        for i in range(0, images.shape[0], cfg.batch_size):
            sl = slice(i, i + cfg.batch_size)
            p, a = condition_inputs(cfg, prompts[sl], aus[sl], images[sl].shape[0])
            feats, att = extract(self.gen, images[sl], p, a, seeds[sl], cfg.t, self._cfg["num_scales"])
            with torch.no_grad():
                out.append(torch.softmax(enc([f.to(dev).float() for f in feats], {k: v.to(dev).float() for k, v in att.items()}), -1).cpu())
            del feats, att  # the captured maps are freed after each batch
        return torch.cat(out).numpy()

    def predict(self, samples):
        import numpy as np
        import torch

        from synfer import labels as L

        size = self.gen.size
        arr = np.stack([np.asarray(s.image.convert("RGB").resize((size, size)), dtype=np.float32) for s in samples])
        images = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
        aus = torch.from_numpy(np.stack([L.au_vector(s.request.aus) for s in samples]))
        return self.predict_tensors(images, [s.request.prompt for s in samples], aus, [s.request.seed for s in samples])
