"""Training of the "sd" generator's parts on FEText, through synfer.training.run_training (mmengine).

- generator (paper 4.2.1, Eq. 3): noise-prediction loss on (image, caption) pairs; the
  tiny model is created from the captions when --model is absent or "tiny"; its text
  encoder trains with it, a real SD text encoder stays frozen (flag to change either).
  Captions are dropped to "" at `caption_dropout` so classifier-free guidance works.
  Two optional loss weights (set for the tiny model by recipes/bootstrap.yaml):
  `expression_focus` weights each pixel by how much the expression classes differ there
  (`expression_map`: between-class over total variance of FEText, eyes and mouth), and
  `snr_gamma` is Min-SNR weighting (Hang et al. 2023, diffusers' `--snr_gamma`). The
  expression explains 0.4% of a 32 px face's pixel variance, so unweighted Eq. 3 teaches
  hair and skin from text long before it teaches a 3-pixel mouth shape (docs/results.md, issue 4).
- AU adapter (4.2.2): same loss (and the same optional weights), UNet/text encoder/VAE
  frozen, only the adapter trains.
  Text, AUs and both are each dropped at `drop_rate` (IP-Adapter's recipe); the
  dropped AU vector is all zeros, the unconditional branch used at sampling.
- VAE: a pixel-space model has none; for a latent model, reconstruction + KL fine-tuning.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from mmengine.model import BaseModel
from torch import nn

from synfer.dataset import read_metadata
from synfer.labels import au_vector, canonical

log = logging.getLogger(__name__)


class FETextDataset(torch.utils.data.Dataset):
    """FEText rows -> {"pixel_values": (3, S, S) in [-1, 1], "input_ids": (L,), "aus": (16,)}.

    Images are centre-cropped to a square and resized (bicubic) to `size`, decoded once and
    cached (FEText for the tiny model is small). No flips: contempt is one-sided.
    """

    def __init__(self, root, size: int, tokenize=None, rows: list[dict] | None = None):
        self.root = Path(root)
        self.rows = rows if rows is not None else read_metadata(self.root)
        if not self.rows:
            raise ValueError(f"{root} holds no images")
        self.size = size
        self.captions = [r.get("caption") or r.get("prompt") or r.get("expression") or "" for r in self.rows]
        self.input_ids = tokenize(self.captions) if tokenize is not None else None
        self.aus = torch.from_numpy(__import__("numpy").stack([au_vector(r.get("aus")) for r in self.rows]))
        self.expressions = [canonical(r.get("expression") or "") for r in self.rows]
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self):
        return len(self.rows)

    def image(self, i: int) -> torch.Tensor:
        if i not in self._cache:
            import numpy as np
            from PIL import Image

            with Image.open(self.root / self.rows[i]["file_name"]) as im:
                im = im.convert("RGB")
                s = min(im.size)
                left, top = (im.width - s) // 2, (im.height - s) // 2
                im = im.crop((left, top, left + s, top + s)).resize((self.size, self.size), Image.BICUBIC)
                self._cache[i] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # uint8
        return self._cache[i].float() / 127.5 - 1.0

    def __getitem__(self, i):
        item = {"pixel_values": self.image(i), "aus": self.aus[i]}
        if self.input_ids is not None:
            item["input_ids"] = self.input_ids[i]
        return item


def expression_map(dataset: FETextDataset, size: int, max_rows: int = 4000, seed: int = 0) -> torch.Tensor | None:
    """(size, size) map in [0, 1]: per pixel, the variance between expression-class means over the total
    variance (averaged over RGB), on up to `max_rows` rows, blurred 3x3. None with fewer than two classes."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=gen)[:max_rows].tolist()
    classes = sorted({dataset.expressions[i] for i in idx} - {""})
    if len(classes) < 2:
        return None
    x = torch.stack([dataset.image(i) for i in idx])
    if x.shape[-1] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="area")
    label = [dataset.expressions[i] for i in idx]
    means = torch.stack([x[[j for j, e in enumerate(label) if e == c]].mean(0) for c in classes])
    ratio = means.var(0).mean(0) / x.var(0).mean(0).clamp_min(1e-8)
    ratio = nn.functional.avg_pool2d(ratio[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
    return ratio / ratio.max().clamp_min(1e-12)


class _Frozen:
    """Holds frozen modules outside the nn.Module tree: kept out of checkpoints, the optimizer, DDP and EMA copies."""

    def __init__(self, **modules):
        self.__dict__.update(modules)

    def __deepcopy__(self, memo):  # EMA deep-copies the train model; frozen parts are shared, not copied
        return self


class DiffusionTrainModel(BaseModel):
    """Eq. 3: || eps - eps_theta(x_t, t, c_text[, c_AU]) ||^2, as an mmengine model.

    Only the trained parts are registered submodules (their weights are the checkpoint);
    frozen ones live in `self.frozen` and follow the batch's device.
    """

    def __init__(self, sd, train_unet: bool, train_text_encoder: bool, train_adapter: bool,
                 caption_dropout: float = 0.0, drop_rate: float = 0.0, pixel_weight: torch.Tensor | None = None,
                 snr_gamma: float | None = None):
        super().__init__()
        self.sd = _Frozen(model=sd)
        self.trained = nn.ModuleDict()
        frozen = {}
        for key, module, train in (("unet", sd.unet, train_unet), ("text_encoder", sd.text_encoder, train_text_encoder),
                                   ("au_adapter", sd.au_adapter, train_adapter), ("vae", sd.vae, False)):
            if module is None:
                continue
            if train:
                self.trained[key] = module
            else:
                frozen[key] = module
        for key, module in frozen.items():  # the adapter lives inside the UNet: freeze the UNet first, then free the adapter
            module.requires_grad_(False)
            module.eval()
        for module in self.trained.values():
            module.requires_grad_(True)
            module.train()
        self.frozen = _Frozen(**frozen)
        self.caption_dropout, self.drop_rate = caption_dropout, drop_rate
        self.register_buffer("uncond_ids", sd.tokenize([""])[0], persistent=False)
        self.snr_gamma = snr_gamma
        # (1, 1, H, W) per-pixel loss weight with mean 1 (expression_focus); None: plain MSE
        self.register_buffer("pixel_weight", None if pixel_weight is None else (pixel_weight / pixel_weight.mean())[None, None],
                             persistent=False)

    def init_weights(self):
        """Weights come from the model folder; mmengine must not re-initialise them (transformers' init_weights would)."""

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen.__dict__.values():
            module.eval()
        return self

    def enable_gradient_checkpointing(self):
        sd = self.sd.model
        sd.unet.enable_gradient_checkpointing()
        if "text_encoder" in self.trained:
            sd.text_encoder.gradient_checkpointing_enable()

    def _follow_device(self, device):
        for module in self.frozen.__dict__.values():
            if module.device != device:
                module.to(device)

    def forward(self, pixel_values, aus, input_ids=None, mode: str = "loss", data_samples=None):
        sd = self.sd.model
        self._follow_device(pixel_values.device)
        b = pixel_values.shape[0]
        if self.training and (self.caption_dropout or self.drop_rate):
            r = torch.rand(b, device=pixel_values.device)
            p_text = self.caption_dropout if sd.au_adapter is None else self.drop_rate
            p = self.drop_rate if sd.au_adapter is not None else 0.0
            drop_text = r < p_text  # text only (generator), or text only in [0, p)
            drop_aus = (r >= p_text) & (r < p_text + p)  # AUs only
            both = (r >= p_text + p) & (r < p_text + 2 * p)  # both
            input_ids = torch.where((drop_text | both)[:, None], self.uncond_ids.to(input_ids.device)[None], input_ids)
            aus = torch.where((drop_aus | both)[:, None], torch.zeros_like(aus), aus)
        with torch.no_grad():
            latents = sd.encode_image(pixel_values) if sd.vae is not None else pixel_values
        if "text_encoder" in self.trained:
            text_emb = sd.encode_text(input_ids=input_ids)
        else:
            with torch.no_grad():
                text_emb = sd.encode_text(input_ids=input_ids)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sd.scheduler.config.num_train_timesteps, (b,), device=latents.device)
        noisy = sd.scheduler.add_noise(latents, noise, t)
        target = noise if sd.scheduler.config.prediction_type == "epsilon" else sd.scheduler.get_velocity(latents, noise, t)
        pred = sd.predict_noise(noisy, t, text_emb, aus if sd.au_adapter is not None else None)
        err = (pred.float() - target.float()) ** 2
        if self.pixel_weight is not None:
            err = err * self.pixel_weight
        err = err.mean(dim=tuple(range(1, err.ndim)))
        if self.snr_gamma:  # Min-SNR: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction
            from diffusers.training_utils import compute_snr

            snr = compute_snr(sd.scheduler, t)
            w = torch.clamp(snr, max=self.snr_gamma)
            err = err * (w / snr if sd.scheduler.config.prediction_type == "epsilon" else w / (snr + 1))
        loss = err.mean()
        if mode == "loss":
            return {"loss": loss}
        return pred


class VAETrainModel(BaseModel):
    """Reconstruction (MSE) + a small KL term, for fine-tuning a latent model's AutoencoderKL."""

    def __init__(self, vae, kl_weight: float = 1e-6):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def init_weights(self):
        """Keep the loaded weights."""

    def forward(self, pixel_values, aus=None, input_ids=None, mode: str = "loss", data_samples=None):
        dist = self.vae.encode(pixel_values).latent_dist
        recon = self.vae.decode(dist.sample()).sample
        loss = nn.functional.mse_loss(recon.float(), pixel_values.float()) + self.kl_weight * dist.kl().mean()
        return {"loss": loss} if mode == "loss" else recon


# ---------------------------------------------------------------- entry points (synfer train ...)


def _train(opts, model, dataset, *, lr: float, ema: bool, name: str):
    from synfer.training import run_training

    return run_training(
        model, dataset, work_dir=opts.run_dir_for(name.replace("_", "-")), max_iters=opts.iters, batch_size=opts.batch_size, lr=lr,
        lr_schedule="cosine", warmup_iters=min(100, opts.iters // 20), checkpoint_interval=opts.checkpoint_interval,
        log_interval=opts.log_interval, seed=opts.seed, resume=opts.resume, ema_momentum=0.005 if ema else None,
        bf16=opts.bf16, grad_checkpointing=opts.grad_checkpointing, num_workers=opts.num_workers, threads=opts.threads, name=name)


def _is_tiny(model: str | None) -> bool:
    return model in (None, "", "tiny")


def _loss_settings(extra: dict) -> dict:
    """The --expression-focus / --snr-gamma options, as recorded next to the trained weights."""
    return {"expression_focus": extra.get("expression_focus") or 0.0, "snr_gamma": extra.get("snr_gamma")}


def _loss_weights(extra: dict, dataset: FETextDataset, sd, seed: int) -> dict:
    """DiffusionTrainModel's optional loss weights from those options."""
    focus = _loss_settings(extra)["expression_focus"]
    emap = expression_map(dataset, sd.unet.config.sample_size, seed=seed) if focus else None
    return {"pixel_weight": None if emap is None else 1.0 + focus * emap, "snr_gamma": extra.get("snr_gamma")}


def train_generator(opts, **overrides) -> Path:
    """Fine-tune (or, for the tiny model, train from scratch) the diffusion model on FEText; returns OUT."""
    from synfer_plugins.sd.model import SDModel, create_tiny_model

    extra = {**opts.extra, **overrides}
    rows = read_metadata(opts.data)
    init_dir = opts.run_dir_for("generator") / "init_model"  # the exact starting point, so --resume rebuilds the same model
    if _is_tiny(opts.model):
        if opts.resume and init_dir.exists():
            sd = SDModel.from_pretrained(init_dir, load_au_adapter=False)
        else:
            captions = [r.get("caption") or r.get("expression") or "" for r in rows]
            sd = create_tiny_model(captions, size=extra.get("size") or 32, seed=opts.seed)  # same on every rank (seeded)
            if int(os.environ.get("RANK", "0")) == 0:
                sd.save_pretrained(init_dir)
    else:
        sd = SDModel.from_pretrained(opts.model, load_au_adapter=False)
    tiny = sd.info.get("kind") == "synfer-tiny-sd"
    train_te = extra.get("train_text_encoder")
    train_te = tiny if train_te is None else train_te
    lr = opts.lr or (1e-3 if tiny else 1e-5)
    ema = tiny if opts.ema is None else opts.ema  # EMA helps the tiny model (docs/results.md, early design measurements)
    dataset = FETextDataset(opts.data, sd.native_size, sd.tokenize, rows)
    model = DiffusionTrainModel(sd, train_unet=True, train_text_encoder=train_te, train_adapter=False,
                                caption_dropout=extra.get("caption_dropout", 0.1), **_loss_weights(extra, dataset, sd, opts.seed))
    result = _train(opts, model, dataset, lr=lr, ema=ema, name="generator")
    if result.is_main:
        before = 0 if _is_tiny(opts.model) else sd.info.get("trained_iters", 0)  # fine-tuning a tiny model counts on
        sd.info.update({"trained_iters": before + result.iters, "train_text_encoder": train_te, "fetext": str(opts.data),
                        "loss_weights": _loss_settings(extra)})
        if not sd.info.get("kind"):
            sd.info["kind"] = "sd"
        sd.save_pretrained(opts.out)
    return Path(opts.out)


def train_au_adapter(opts, **overrides) -> Path:
    """Train the AU adapter on a frozen model; writes au_adapter.* into OUT (the whole model if OUT is elsewhere)."""
    from synfer_plugins.sd.au_adapter import AUAdapter
    from synfer_plugins.sd.model import SDModel

    extra = {**opts.extra, **overrides}
    sd = SDModel.from_pretrained(opts.model, load_au_adapter=False)
    adapter = AUAdapter.for_unet(sd.unet, num_tokens=extra.get("num_tokens", 4), hidden_dim=extra.get("hidden_dim", 256))
    sd.set_au_adapter(adapter)
    tiny = sd.info.get("kind") == "synfer-tiny-sd"
    dataset = FETextDataset(opts.data, sd.native_size, sd.tokenize)
    model = DiffusionTrainModel(sd, train_unet=False, train_text_encoder=False, train_adapter=True, drop_rate=extra.get("drop_rate", 0.05),
                                **_loss_weights(extra, dataset, sd, opts.seed))
    ema = tiny if opts.ema is None else opts.ema
    result = _train(opts, model, dataset, lr=opts.lr or (1e-3 if tiny else 1e-4), ema=ema, name="au_adapter")
    if result.is_main:
        adapter.trained_with = {"iters": result.iters, "fetext": str(opts.data), "loss_weights": _loss_settings(extra)}
        out = Path(opts.out)
        if out.resolve() == Path(opts.model).resolve():
            adapter.save(out)
        else:
            sd.save_pretrained(out)
    return Path(opts.out)


def train_vae(opts, **overrides) -> Path | None:
    """Fine-tune a latent model's VAE on FEText; a pixel-space model has none (prints why, returns None)."""
    import click

    from synfer_plugins.sd.model import SDModel

    if _is_tiny(opts.model) or not (Path(opts.model) / "vae").is_dir():
        click.echo(f"skipped: {opts.model or 'the tiny default model'} is a pixel-space model (no vae/ folder); "
                   "it denoises images directly, so there is no VAE to train.")
        return None
    if opts.data is None:
        raise click.UsageError("--data FETEXT_DIR is required to train a VAE")
    sd = SDModel.from_pretrained(opts.model, load_au_adapter=False)
    dataset = FETextDataset(opts.data, sd.native_size)
    result = _train(opts, VAETrainModel(sd.vae), dataset, lr=opts.lr or 1e-5, ema=bool(opts.ema), name="vae")
    if result.is_main:
        out = Path(opts.out)
        if out.resolve() != Path(opts.model).resolve():
            shutil.copytree(opts.model, out, dirs_exist_ok=True)
        shutil.rmtree(out / "vae", ignore_errors=True)
        sd.vae.save_pretrained(str(out / "vae"))
    return Path(opts.out)
