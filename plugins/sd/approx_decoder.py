"""A cheap differentiable latent-to-RGB decoder for semantic guidance (`semantic_guidance.decoder: approx`).

Eq. 5 only needs the small face the guidance classifier reads (64x64 for tiny-cnn, whose net resizes to
`size`, and for fer-minixception, whose Keras input is 64x64), yet the VAE decoder is 75% of a guided
update's FLOPs at 512 px (issue 16). `ApproxDecoder` maps SD latents straight to RGB at that size: a
few 3x3 convolutions at the latent resolution, then x2 upsamplings (or average-pool downsamplings) to
`size`. At 512 px (64x64 latents, size 64) it never upsamples: 0.64 GFLOP a forward (78k parameters) against the
VAE decoder's 2515 GFLOP.

It is distilled from the model's own VAE by `synfer train approx-decoder`. FEText images are encoded once
(the latent cache of latent_cache.py). Guidance never decodes a clean latent: it decodes the model's x0
estimate (Eq. 4) at a guided step. So each latent is noised to a random timestep of the default guidance
window and the model's own UNet predicts x0 from it; the VAE decodes that x0 and the result is resized to
`size` the way the classifiers resize (bilinear, antialiased). The decoder learns it with an MSE loss.

Guidance reads the decoder's gradient, not its pixels. With `--classifier NAME` the decoder also learns to
pass the guidance classifier's gradient the way the VAE does: for a random class y, v = d CE(f(image), y) /
d image at the VAE's image, and the loss adds gradient_weight * (1 - cos(J_approx^T v, J_vae^T v)).
On the latent procedural model this is what moved the guidance gain (bench/README.md). The weights go to
MODEL/approx_decoder/ (config.json + model.safetensors), beside the model they were distilled from.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from synfer_plugins.sd.prediction import prediction_type, split_prediction

FOLDER = "approx_decoder"
GUIDED_SPAN = 0.7  # x0 estimates come from timesteps t < 0.7 T: the default guidance window (semantic_guidance.start 0.3)


class ApproxDecoder(nn.Module):
    """(N, C, h, w) scaled latents -> (N, 3, size, size) RGB in about [-1, 1] (not clamped)."""

    def __init__(self, latent_channels: int = 4, latent_size: int = 64, size: int = 64, width: int = 64, depth: int = 3):
        super().__init__()
        self.config = {"latent_channels": latent_channels, "latent_size": latent_size, "size": size, "width": width, "depth": depth}
        ratio = size / latent_size
        steps = round(math.log2(ratio)) if ratio > 0 else 0
        if 2 ** steps != ratio:
            raise ValueError(f"approx decoder: output size {size} must be the latent size {latent_size} times a power of 2")
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        ch = width
        for _ in range(max(steps, 0)):  # each x2 upsampling halves the channels (down to 16): the cost stays at the latent side's
            out = max(16, ch // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, out, 3, padding=1), nn.SiLU()]
            ch = out
        for _ in range(max(-steps, 0)):
            layers += [nn.AvgPool2d(2)]
        layers.append(nn.Conv2d(ch, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    @property
    def size(self) -> int:
        return int(self.config["size"])

    def forward(self, latents):
        return self.net(latents.to(self.net[0].weight.dtype))

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**self.config, **(extra or {})}, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, device="cpu", dtype=None) -> "ApproxDecoder":
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        net = cls(**{k: cfg[k] for k in ("latent_channels", "latent_size", "size", "width", "depth")})
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
        net.info = cfg
        return net.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)


def load_for(model_path: str | Path, device="cpu", dtype=None) -> ApproxDecoder:
    """MODEL/approx_decoder, or an error that names the command that makes it."""
    folder = Path(model_path) / FOLDER
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"semantic_guidance.decoder is 'approx' but {folder} holds no approximate decoder; distil one from the "
                                f"model's VAE with 'synfer train approx-decoder --model {model_path} --data FETEXT_DIR' (minutes on a CPU), "
                                "or set semantic_guidance.decoder: vae")
    return ApproxDecoder.load(folder, device=device, dtype=dtype)


def vae_target(sd, latents, size: int):
    """What the classifier reads of the VAE's decode: the image resized to `size` (bilinear, antialiased), in [-1, 1]."""
    image = sd.decode(latents).float().clamp(-1, 1)
    if image.shape[-1] != size:
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=image.shape[-1] > size)
    return image


def x0_estimates(sd, z, captions, gen):
    """The model's x0 estimate (Eq. 4) from z noised to a random timestep t < GUIDED_SPAN * T: what guidance decodes."""
    a_all = sd.scheduler.alphas_cumprod
    t = torch.randint(int(GUIDED_SPAN * len(a_all)), (len(z),), generator=gen)
    a = a_all[t].view(-1, 1, 1, 1).float()
    xt = a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape, generator=gen)
    out = sd.predict_noise(xt.to(sd.device, sd.dtype), t.to(sd.device), sd.encode_text(captions)).float().cpu()
    return split_prediction(out, xt, a, prediction_type(sd.scheduler))[0]  # Eq. 4, whatever the model predicts


def gradient_pair(sd, classifier, x0, size: int, gen):
    """(v, g) for a random class per sample: v = d CE(f(image), y) / d image at the VAE's image of x0, g = J_vae^T v."""
    x = x0.detach().to(sd.device, sd.dtype).clone().requires_grad_(True)  # a copy: x0 itself stays a plain input
    with torch.enable_grad():
        image = vae_target(sd, x, size)
        seen = image.detach().requires_grad_(True)
        logits = classifier.forward(seen)
        y = torch.randint(logits.shape[1], (len(x0),), generator=gen).to(logits.device)
        (v,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), seen)
        (g,) = torch.autograd.grad(image, x, v)
    return v.cpu().half(), g.float().cpu()


def distillation_pairs(sd, latents, captions, size: int, seed: int = 0, batch_size: int = 32, classifier=None) -> dict:
    """{"latents": x0 estimates of `latents`, "target": their VAE decode at `size` (float16)} and, with a classifier,
    "v" and "g" (gradient_pair) per row."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {"latents": [], "target": []}
    with torch.no_grad():
        for start in tqdm(range(0, len(latents), batch_size), desc="distillation pairs", unit="batch"):
            z = torch.from_numpy(np.array(latents[start:start + batch_size], dtype=np.float32))
            x0 = x0_estimates(sd, z, captions[start:start + batch_size], gen)
            rows["latents"].append(x0)
            rows["target"].append(vae_target(sd, x0.to(sd.device, sd.dtype), size).cpu().half())
            if classifier is not None:
                v, g = gradient_pair(sd, classifier, x0, size, gen)
                rows.setdefault("v", []).append(v)
                rows.setdefault("g", []).append(g)
    return {k: torch.cat(v) for k, v in rows.items()}


def vjp_cosine(decoder, latents, v, g):
    """Per-row cosine between J_approx^T v and g = J_vae^T v: whether the decoder passes the classifier's gradient
    to the latents in the VAE's direction (guidance normalises the step, so the direction is what counts)."""
    x = latents.detach().float().requires_grad_(True)
    with torch.enable_grad():
        (got,) = torch.autograd.grad(decoder(x).float(), x, v.float())
    return _cosine(got, g)


def _cosine(a, b):
    return F.cosine_similarity(a.flatten(1), b.float().flatten(1), dim=1)


def image_error(got, want) -> dict:
    """Mean absolute and RMS error of decoded images against the VAE's (images in [-1, 1])."""
    d = got.float().clamp(-1, 1) - want.float()
    return {"mae": float(d.abs().mean()), "rmse": float(d.pow(2).mean().sqrt()), "target_std": float(want.float().std())}


def decoder_error(decoder, sd, latents, size: int) -> dict:
    """Mean absolute and RMS error of the decoder against the VAE target (images in [-1, 1]) on `latents`."""
    with torch.no_grad():
        return image_error(decoder(latents), vae_target(sd, latents, size))


# ---------------------------------------------------------------- distillation (synfer train approx-decoder)


def _train_model_class():
    from mmengine.model import BaseModel

    class ApproxDecoderTrainModel(BaseModel):
        def __init__(self, decoder, gradient_weight: float = 0.0):
            super().__init__()
            self.decoder, self.gradient_weight = decoder, gradient_weight

        def init_weights(self):
            """Keep the weights as built (seeded)."""

        def forward(self, latents, target, v=None, g=None, mode: str = "loss"):
            matched = mode == "loss" and v is not None and bool(self.gradient_weight)
            x = latents.detach().requires_grad_(True) if matched else latents
            pred = self.decoder(x).float()  # one forward serves the MSE and the vector-Jacobian product
            if mode != "loss":
                return pred
            losses = {"loss_mse": F.mse_loss(pred, target.float())}
            if matched:
                (got,) = torch.autograd.grad(pred, x, v.float(), create_graph=True)
                losses["loss_grad"] = self.gradient_weight * (1 - _cosine(got, g)).mean()
            return losses

    return ApproxDecoderTrainModel


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, pairs: dict):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs["latents"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.pairs.items()}


def train_approx_decoder(model: str | Path, data: str | Path, out: str | Path | None = None, *, size: int = 64, width: int = 64,
                         depth: int = 3, iters: int = 2000, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                         classifier: str | None = None, gradient_weight: float = 1.0, draws: int = 1, work_dir: str | Path | None = None,
                         resume: bool = False, threads: int | None = None, log_interval: int = 100,
                         holdout: float = 0.1) -> tuple[Path, dict]:
    """Distil MODEL's VAE decoder into an ApproxDecoder at `size`, on the model's own x0 estimates; with `classifier`
    (a guidance-classifier plugin name) it also learns to pass that classifier's gradient as the VAE does.
    Returns (folder written, held-out error)."""
    from synfer.engine.registry import get_registry
    from synfer.engine.training import run_training, seed_everything
    from synfer_plugins.sd.data import FETextDataset
    from synfer_plugins.sd.latent_cache import cached_latents
    from synfer_plugins.sd.model import SDModel

    if threads:
        torch.set_num_threads(int(threads))
    model = Path(model)
    out = Path(out) if out else model / FOLDER
    work = Path(work_dir) if work_dir else out / "work"
    sd = SDModel.from_pretrained(model, load_au_adapter=False)
    if sd.vae is None:
        raise ValueError(f"{model} is a pixel-space model (no vae/): its 'latents' are the image, so guidance needs no decoder; "
                         "semantic_guidance.decoder: approx is for latent models")
    for net in sd.modules():
        net.requires_grad_(False).eval()
    clf = get_registry().build("guidance_classifier", {"plugin": classifier}) if classifier else None
    dataset = FETextDataset(data, sd.native_size)
    latents, _ = cached_latents(sd, dataset, work, model / "vae", data)
    n_test = max(1, int(round(holdout * len(latents)))) if len(latents) > 1 else 0
    n_train = len(latents) - n_test
    # `draws` x0 estimates per face (fresh timestep, noise and class each): more pairs for the same encoded faces
    draw = [distillation_pairs(sd, latents[:n_train], dataset.captions[:n_train], size, seed=seed + 1000 * k, classifier=clf)
            for k in range(draws)]
    train = {key: torch.cat([d[key] for d in draw]) for key in draw[0]}
    test = distillation_pairs(sd, latents[n_train:] if n_test else latents[:1], dataset.captions[n_train:] if n_test else dataset.captions[:1],
                              size, seed=seed + 1, classifier=clf)
    seed_everything(seed)
    decoder = ApproxDecoder(sd.vae.config.latent_channels, sd.native_size // sd.vae_scale_factor, size, width, depth)
    result = run_training(_train_model_class()(decoder, gradient_weight if clf else 0.0), _Pairs(train), work_dir=work, max_iters=iters,
                          batch_size=batch_size, lr=lr, lr_schedule="cosine", warmup_iters=min(50, iters // 20),
                          log_interval=log_interval, seed=seed, resume=resume, name="approx_decoder")
    decoder = result.model.decoder.eval()
    with torch.no_grad():
        error = image_error(decoder(test["latents"]), test["target"])
    if clf is not None:
        error["gradient_cosine"] = float(vjp_cosine(decoder, test["latents"], test["v"], test["g"]).mean())
    if result.is_main:
        decoder.save(out, {"model": str(model.resolve()), "fetext": str(data), "iters": result.iters, "heldout_images": int(len(test["latents"])),
                           "inputs": f"x0 estimates at t < {GUIDED_SPAN} T", "classifier": classifier,
                           "gradient_weight": gradient_weight if clf else 0.0, "draws": draws, "heldout_error": error})
    return out, error
