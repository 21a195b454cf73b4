"""Training of the "sd" generator's parts on FEText, through synfer.engine.training.run_training (mmengine).

- generator (paper 4.2.1, Eq. 3): noise-prediction loss on (image, caption) pairs; the
  tiny model is created from the captions when --model is absent or "tiny"; its text
  encoder trains with it, a real SD text encoder stays frozen (flag to change either).
  Captions are dropped to "" at `caption_dropout` so classifier-free guidance works.
  Two optional loss weights (set for the tiny model by recipes/bootstrap.yaml):
  `expression_focus` weights each pixel by how much the expression classes differ there
  (`expression_map`: between-class over total variance of FEText, eyes and mouth), and
  `snr_gamma` is Min-SNR weighting (Hang et al. 2023, diffusers' `--snr_gamma`). The
  expression explains 0.4% of a 32 px face's pixel variance, so unweighted Eq. 3 teaches
  hair and skin from text long before it teaches a 3-pixel mouth shape (docs/results.md, Shipped models).
- AU adapter (4.2.2): same loss (and the same optional weights), UNet/text encoder/VAE
  frozen, only the adapter trains.
  Text, AUs and both are each dropped at `drop_rate` (IP-Adapter's recipe); the
  dropped AU vector is all zeros, the unconditional branch used at sampling.
- VAE: a pixel-space model has none; for a latent model, reconstruction + KL fine-tuning.

For a one-GPU lab (as diffusers' example scripts): `--lora-rank R` trains a peft LoRA on the UNet only
(lora.py; saved where `pipe.load_lora_weights` reads it), `--grad-accum N` and `--optimizer adamw8bit`
(synfer.engine.training.run_training), frozen modules held in the training dtype under `--bf16`, and the VAE
latents (or, in pixel space, the resized images) computed once into a memory-mapped cache on disk
(latent_cache.py) instead of encoding every image at every step.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from mmengine.model import BaseModel
from torch import nn

from synfer.engine.dataset import read_metadata
from synfer_plugins.sd.data import FETextDataset, expression_map  # noqa: F401  (tests and callers import them from here)
from synfer_plugins.sd.prediction import prediction_type, training_target

log = logging.getLogger(__name__)


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
                 snr_gamma: float | None = None, lora_rank: int | None = None, frozen_dtype: torch.dtype | None = None,
                 cached_latents: bool = False):
        super().__init__()
        self.sd = _Frozen(model=sd)
        self.trained = nn.ModuleDict()
        frozen = {}
        texts = [(name, getattr(sd, name), train_text_encoder) for name in sd.text_parts]  # SDXL: text_encoder, text_encoder_2
        for key, module, train in (("unet", sd.unet, train_unet), *texts, ("au_adapter", sd.au_adapter, train_adapter), ("vae", sd.vae, False)):
            if module is None or (key == "vae" and cached_latents):  # latents come from the cache: the VAE never runs
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
        if lora_rank:  # the UNet's base weights freeze again; only the LoRA A/B matrices train (lora.py)
            from synfer_plugins.sd.lora import add_lora

            n = add_lora(sd.unet, lora_rank)
            log.info("LoRA rank %d on the UNet: %d trainable parameters", lora_rank, n)
        if frozen_dtype is not None:
            frozen = self._cast_frozen(sd, frozen, frozen_dtype, lora_rank)
        self.frozen = _Frozen(**frozen)
        self.caption_dropout, self.drop_rate = caption_dropout, drop_rate
        self.register_buffer("uncond_ids", sd.tokenize([""])[0], persistent=False)  # (L,); SDXL (2, L)
        self.snr_gamma = snr_gamma
        # (1, 1, H, W) per-pixel loss weight with mean 1 (expression_focus); None: plain MSE
        self.register_buffer("pixel_weight", None if pixel_weight is None else (pixel_weight / pixel_weight.mean())[None, None],
                             persistent=False)

    def _cast_frozen(self, sd, frozen: dict, dtype, lora_rank) -> dict:
        """Frozen modules in the training dtype (bf16: half the memory, no cast at every step), as diffusers' scripts
        do. The VAE and a frozen text encoder train on copies (the model's float32 weights are what gets saved);
        the UNet, which holds the trained LoRA or AU adapter, is cast in place and its trained parameters kept float32."""
        import copy

        from diffusers.training_utils import cast_training_params

        out = {k: copy.deepcopy(m).to(dtype) if k == "vae" or k in sd.text_parts else m for k, m in frozen.items()}
        if "unet" in frozen or lora_rank:
            sd.unet.to(dtype)
            cast_training_params([sd.unet, *self.trained.values()], torch.float32)
        return out

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
        for name in sd.text_parts:
            if name in self.trained:
                getattr(sd, name).gradient_checkpointing_enable()

    def _follow_device(self, device):
        for module in self.frozen.__dict__.values():
            if module.device != device:
                module.to(device)

    def draw(self, latents):
        """The step's noise and timesteps (a test replaces this to make every draw a function of the sample)."""
        sd = self.sd.model
        noise = torch.randn_like(latents)  # noise first, then t: the draw order of earlier versions (same bytes)
        return noise, torch.randint(0, sd.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)

    def _text(self, input_ids):
        sd = self.sd.model
        if any(name in self.trained for name in sd.text_parts):
            return sd.encode_tokens(input_ids)
        encoders = [getattr(self.frozen, name, getattr(sd, name)) for name in sd.text_parts]  # the bf16 copies under --bf16
        with torch.no_grad():
            return sd.encode_tokens(input_ids, encoders)

    def _latents(self, pixel_values):
        vae = getattr(self.frozen, "vae", None)
        if vae is None:
            return pixel_values
        with torch.no_grad():
            return vae.encode(pixel_values.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor

    def forward(self, pixel_values=None, aus=None, input_ids=None, latents=None, mode: str = "loss", data_samples=None):
        sd = self.sd.model
        x = latents if latents is not None else pixel_values
        self._follow_device(x.device)
        b = x.shape[0]
        if self.training and (self.caption_dropout or self.drop_rate):
            r = torch.rand(b, device=x.device)
            p_text = self.caption_dropout if sd.au_adapter is None else self.drop_rate
            p = self.drop_rate if sd.au_adapter is not None else 0.0
            drop_text = r < p_text  # text only (generator), or text only in [0, p)
            drop_aus = (r >= p_text) & (r < p_text + p)  # AUs only
            both = (r >= p_text + p) & (r < p_text + 2 * p)  # both
            rows = (-1, *[1] * (input_ids.ndim - 1))  # one flag per sample, over its ids (SDXL: both tokenizers')
            input_ids = torch.where((drop_text | both).view(rows), self.uncond_ids.to(input_ids.device)[None], input_ids)
            aus = torch.where((drop_aus | both)[:, None], torch.zeros_like(aus), aus)
        if latents is None:
            latents = self._latents(pixel_values)
        latents = latents.float()
        text_emb = self._text(input_ids)
        noise, t = self.draw(latents)
        noisy = sd.scheduler.add_noise(latents, noise, t)
        target = training_target(sd.scheduler, latents, noise, t)  # eps, v (SD 2.x 768-v) or x0, as the scheduler says
        pred = sd.predict_noise(noisy, t, text_emb, aus if sd.au_adapter is not None else None)
        err = (pred.float() - target.float()) ** 2
        if self.pixel_weight is not None:
            err = err * self.pixel_weight
        err = err.mean(dim=tuple(range(1, err.ndim)))
        if self.snr_gamma:  # Min-SNR: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction, as is for x0
            from diffusers.training_utils import compute_snr

            snr = compute_snr(sd.scheduler, t)
            w = torch.clamp(snr, max=self.snr_gamma)
            kind = prediction_type(sd.scheduler)
            err = err * (w / snr if kind == "epsilon" else w / (snr + 1) if kind == "v_prediction" else w)
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
    from synfer.engine.training import run_training

    return run_training(
        model, dataset, work_dir=opts.run_dir_for(name.replace("_", "-")), max_iters=opts.iters, batch_size=opts.batch_size, lr=lr,
        lr_schedule="cosine", warmup_iters=min(100, opts.iters // 20), checkpoint_interval=opts.checkpoint_interval,
        log_interval=opts.log_interval, seed=opts.seed, resume=opts.resume, ema_momentum=0.005 if ema else None,
        bf16=opts.bf16, grad_checkpointing=opts.grad_checkpointing, num_workers=opts.num_workers, threads=opts.threads, name=name,
        grad_accum=opts.grad_accum, optimizer=opts.optimizer)


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


def _dataset(opts, sd, model_dir, rows=None, pixels: bool = False) -> FETextDataset:
    """FEText at the model's size, served from the on-disk cache (latent_cache.py) of the run's work folder."""
    from synfer_plugins.sd.latent_cache import cached_latents

    dataset = FETextDataset(opts.data, sd.native_size, None if pixels else sd.tokenize, rows)
    vae_dir = None if (pixels or model_dir is None) else Path(model_dir) / "vae"
    array, _ = cached_latents(None if pixels else sd, dataset, opts.run_dir, vae_dir, opts.data)
    dataset.use_cache(array)
    return dataset


def _common(opts, sd) -> dict:
    """DiffusionTrainModel's arguments for --bf16 and the cache."""
    return {"frozen_dtype": torch.bfloat16 if opts.bf16 else None, "cached_latents": sd.vae is not None}


def load_backbone(path, backbones=None):
    """The model folder through the backbone that runs it (backbones.backbone_for), without its AU adapter."""
    from synfer_plugins.sd.backbones import backbone_for

    return backbone_for(path, backbones).from_pretrained(path, load_au_adapter=False)


def train_generator(opts, backbones=None, **overrides) -> Path:
    """Fine-tune (or, for the tiny model, train from scratch) the diffusion model on FEText; returns OUT.
    With --lora-rank: a LoRA on the UNet only; OUT gets the UNet with the LoRA fused in and lora/ (lora.py)."""
    import click

    from synfer_plugins.sd.model import create_tiny_model

    extra = {**opts.extra, **overrides}
    lora_rank = extra.get("lora_rank") or None
    if lora_rank and not _is_tiny(opts.model) and Path(opts.out).resolve() == Path(opts.model).resolve():
        raise click.UsageError("--lora-rank keeps the base model as it is (the LoRA file applies to it): give an --out other than --model")
    if extra.get("channels") and not _is_tiny(opts.model):
        raise click.UsageError(f"--channels sets the width of a tiny model trained from scratch; {opts.model} has its own: "
                               "leave out --model to start from scratch, or --channels to fine-tune it")
    rows = read_metadata(opts.data)
    init_dir = opts.run_dir_for("generator") / "init_model"  # the exact starting point, so --resume rebuilds the same model
    if _is_tiny(opts.model):
        if opts.resume and init_dir.exists():
            sd = load_backbone(init_dir)
        else:
            captions = [r.get("caption") or r.get("expression") or "" for r in rows]
            sd = create_tiny_model(captions, size=extra.get("size") or 32, seed=opts.seed,  # same on every rank (seeded)
                                   block_out_channels=extra.get("channels") or (32, 64, 64))
            if int(os.environ.get("RANK", "0")) == 0:
                sd.save_pretrained(init_dir)
        base = init_dir
    else:
        sd = load_backbone(opts.model, backbones)
        base = Path(opts.model)
    tiny = sd.info.get("kind") == "synfer-tiny-sd"
    train_te = extra.get("train_text_encoder")
    train_te = (tiny and not lora_rank) if train_te is None else train_te
    lr = opts.lr or (1e-3 if tiny else 1e-4 if lora_rank else 1e-5)  # 1e-4: diffusers' LoRA example
    ema = tiny if opts.ema is None else opts.ema  # EMA on for the tiny model, as in the early design probes (docs/results.md)
    dataset = _dataset(opts, sd, base, rows)
    model = DiffusionTrainModel(sd, train_unet=True, train_text_encoder=train_te, train_adapter=False,
                                caption_dropout=extra.get("caption_dropout", 0.1), lora_rank=lora_rank, **_common(opts, sd),
                                **_loss_weights(extra, dataset, sd, opts.seed))
    result = _train(opts, model, dataset, lr=lr, ema=ema, name="generator")
    if result.is_main:
        before = 0 if _is_tiny(opts.model) else sd.info.get("trained_iters", 0)  # fine-tuning a tiny model counts on
        sd.info.update({"trained_iters": before + result.iters, "train_text_encoder": train_te, "fetext": str(opts.data),
                        "loss_weights": _loss_settings(extra)})
        if not sd.info.get("kind"):
            sd.info["kind"] = "sd"
        if lora_rank:
            _save_lora_model(sd, base, Path(opts.out), lora_rank)
        else:
            sd.save_pretrained(opts.out)
    return Path(opts.out)


def _save_lora_model(sd, base: Path, out: Path, rank: int) -> None:
    """OUT/lora/pytorch_lora_weights.safetensors, and OUT as a whole model whose UNet is the float32 base UNet with
    that file loaded by diffusers and fused (what `pipe.load_lora_weights(OUT/lora)` on the base computes)."""
    from diffusers import UNet2DConditionModel

    from synfer_plugins.sd.lora import LORA_DIR, fuse_lora_file, save_lora

    save_lora(out / LORA_DIR, sd.unet, sd.pipeline_classes[0])
    sd.unet = fuse_lora_file(UNet2DConditionModel.from_pretrained(str(base / "unet")), out / LORA_DIR)
    sd.info["lora"] = {"rank": int(rank), "base": str(base.resolve()), "file": f"{LORA_DIR}/pytorch_lora_weights.safetensors",
                       "note": "the LoRA applies to the base model; unet/ here already has it fused in"}
    sd.save_pretrained(out)


def train_au_adapter(opts, backbones=None, **overrides) -> Path:
    """Train the AU adapter on a frozen model; writes au_adapter.* into OUT (the whole model if OUT is elsewhere)."""
    from synfer_plugins.sd.au_adapter import AUAdapter

    extra = {**opts.extra, **overrides}
    sd = load_backbone(opts.model, backbones)
    adapter = AUAdapter.for_unet(sd.unet, num_tokens=extra.get("num_tokens", 4), hidden_dim=extra.get("hidden_dim", 256))
    sd.set_au_adapter(adapter)
    tiny = sd.info.get("kind") == "synfer-tiny-sd"
    dataset = _dataset(opts, sd, opts.model)
    model = DiffusionTrainModel(sd, train_unet=False, train_text_encoder=False, train_adapter=True, drop_rate=extra.get("drop_rate", 0.05),
                                **_common(opts, sd), **_loss_weights(extra, dataset, sd, opts.seed))
    ema = tiny if opts.ema is None else opts.ema
    result = _train(opts, model, dataset, lr=opts.lr or (1e-3 if tiny else 1e-4), ema=ema, name="au_adapter")
    if result.is_main:
        adapter.trained_with = {"iters": result.iters, "fetext": str(opts.data), "loss_weights": _loss_settings(extra)}
        out = Path(opts.out)
        if out.resolve() == Path(opts.model).resolve():
            adapter.save(out)
        elif opts.bf16:  # the frozen UNet was cast to bf16 in place: copy the model's own float32 files instead
            shutil.copytree(opts.model, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("work"))
            adapter.save(out)
        else:
            sd.save_pretrained(out)
    return Path(opts.out)


def train_vae(opts, backbones=None, **overrides) -> Path | None:
    """Fine-tune a latent model's VAE on FEText; a pixel-space model has none (prints why, returns None)."""
    import click

    if _is_tiny(opts.model) or not (Path(opts.model) / "vae").is_dir():
        click.echo(f"skipped: {opts.model or 'the tiny default model'} is a pixel-space model (no vae/ folder); "
                   "it denoises images directly, so there is no VAE to train.")
        return None
    if opts.data is None:
        raise click.UsageError("--data FETEXT_DIR is required to train a VAE")
    sd = load_backbone(opts.model, backbones)
    dataset = _dataset(opts, sd, None, pixels=True)  # the resized images, decoded once (uint8, memory-mapped)
    result = _train(opts, VAETrainModel(sd.vae), dataset, lr=opts.lr or 1e-5, ema=bool(opts.ema), name="vae")
    if result.is_main:
        out = Path(opts.out)
        if out.resolve() != Path(opts.model).resolve():
            shutil.copytree(opts.model, out, dirs_exist_ok=True)
        shutil.rmtree(out / "vae", ignore_errors=True)
        sd.vae.save_pretrained(str(out / "vae"))
    return Path(opts.out)
