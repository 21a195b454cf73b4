"""`synfer train generator | au-adapter | vae`: the "sd" plugin's commands (hook register_commands).

Each delegates to the generator plugin named by `--generator` (default "sd"), which implements
`train_generator(opts)`, `train_au_adapter(opts)`, `train_vae(opts)` classmethods taking a
`TrainOptions`. No torch import at module level: `synfer --help` loads this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click


@dataclass
class TrainOptions:
    """What every `synfer train` subcommand passes to the plugin that trains."""

    data: Path | None  # a FEText folder (synfer dataset format)
    model: str | None  # model folder to start from; None/"tiny": create the tiny default
    out: Path  # where the trained model (or adapter) is written
    iters: int
    batch_size: int
    lr: float | None  # None: the trainer's default for this model
    resume: bool
    seed: int
    work_dir: Path | None  # checkpoints + logs; None: OUT/work
    ema: bool | None  # None: the trainer's default
    bf16: bool = False
    grad_checkpointing: bool = False
    threads: int | None = None
    log_interval: int = 50
    checkpoint_interval: int | None = None
    num_workers: int = 0
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes, CUDA)
    extra: dict[str, Any] = field(default_factory=dict)  # subcommand-specific options

    @property
    def run_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.out) / "work"

    def run_dir_for(self, kind: str) -> Path:
        """This training kind's own work folder (see synfer.engine.training.kind_work_dir)."""
        from synfer.engine.training import kind_work_dir

        return kind_work_dir(self.out, kind, self.work_dir)


def _common_options(fn):
    opts = [
        click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="FEText folder (images + metadata.jsonl with caption, aus, expression)."),
        click.option("--model", default=None, help="Model folder to start from (diffusers SD 1.x layout); 'tiny' or absent: create the tiny default."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder."),
        click.option("--iters", type=int, default=1500, show_default=True, help="Training iterations."),
        click.option("--batch-size", type=int, default=16, show_default=True),
        click.option("--lr", type=float, default=None, help="Learning rate (default depends on the model)."),
        click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in the work dir."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Checkpoints and logs (default OUT/work)."),
        click.option("--ema/--no-ema", default=None, help="Exponential moving average of the weights (default depends on the model)."),
        click.option("--bf16", is_flag=True, help="bf16 autocast (~20% faster on this CPU; GPUs with bf16)."),
        click.option("--grad-checkpointing", is_flag=True, help="Trade compute for memory (large UNets on GPUs)."),
        click.option("--threads", type=int, default=None, help="torch.set_num_threads."),
        click.option("--log-interval", type=int, default=50, show_default=True),
        click.option("--checkpoint-interval", type=int, default=None, help="Iterations between checkpoints (default min(500, iters))."),
        click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader workers."),
        click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Micro-batches of --batch-size per optimizer step (effective batch = both); --iters counts optimizer steps."),
        click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit"]), default="adamw", show_default=True,
                     help="adamw8bit: bitsandbytes' 8-bit AdamW (CUDA GPUs; needs pip install bitsandbytes)."),
        click.option("--generator", "plugin", default="sd", show_default=True, help="Generator plugin that trains the model."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _options(kw: dict, extra: dict) -> tuple[str, TrainOptions]:
    from synfer.engine.optimizers import check_optimizer
    from synfer.engine.training import seed_everything

    plugin = kw.pop("plugin")
    try:
        check_optimizer(kw["optimizer"])  # before any model loads
    except ValueError as exc:
        raise click.UsageError(str(exc))
    seed_everything(kw["seed"])  # --seed fixes the whole run: weights a plugin creates before run_training too
    return plugin, TrainOptions(**kw, extra=extra)


def _trainer(plugin: str, method: str):
    from synfer.engine.registry import PluginError, get_registry

    try:
        cls = get_registry().get("generator", plugin)
    except PluginError as exc:
        raise click.ClickException(str(exc))
    fn = getattr(cls, method, None)
    if fn is None:
        raise click.ClickException(f"generator plugin {plugin!r} ({cls.__module__}.{cls.__name__}) has no {method}(); "
                                   "it cannot be trained with synfer train")
    return fn


def _loss_weight_options(f):
    """Eq. 3's optional weights, shared by the generator and the AU adapter."""
    f = click.option("--snr-gamma", type=float, default=None, help="Min-SNR loss weighting (5 is the usual value); default off.")(f)
    return click.option("--expression-focus", type=float, default=0.0, show_default=True,
                        help="Extra loss weight where expressions differ (eyes, mouth): 1 + F * map; 0: plain Eq. 3.")(f)


@click.command("generator")
@_common_options
@click.option("--caption-dropout", type=float, default=0.1, show_default=True, help="Share of empty captions (for classifier-free guidance).")
@click.option("--train-text-encoder/--freeze-text-encoder", default=None, help="Default: trained for the tiny model, frozen for real SD.")
@click.option("--size", type=int, default=None, help="Tiny model resolution (default 32).")
@click.option("--channels", default=None, metavar="C1,C2,...",
              help="Tiny model from scratch: the UNet's channels per level, multiples of 8 (default 32,64,64).")
@click.option("--lora-rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="Train a LoRA of this rank on the UNet (peft) instead of the whole UNet; 0: full fine-tuning. OUT gets the fused "
                   "UNet and lora/pytorch_lora_weights.safetensors (diffusers' pipe.load_lora_weights, on the base model).")
@_loss_weight_options
def train_generator_cmd(caption_dropout, train_text_encoder, size, channels, lora_rank, expression_focus, snr_gamma, **kw):
    """Fine-tune the diffusion model on FEText with the noise-prediction loss (paper Eq. 3)."""
    plugin, opts = _options(kw, dict(caption_dropout=caption_dropout, train_text_encoder=train_text_encoder, size=size,
                                     channels=parse_channels(channels), lora_rank=lora_rank, expression_focus=expression_focus,
                                     snr_gamma=snr_gamma))
    if opts.data is None:
        raise click.UsageError("--data FETEXT_DIR is required")
    result = _trainer(plugin, "train_generator")(opts)
    click.echo(f"generator written to {result}")


def parse_channels(text: str | None) -> tuple[int, ...] | None:
    """'16,32,32' -> (16, 32, 32); each a positive multiple of 8 (the tiny UNet's GroupNorm has 8 groups), at least 2 levels."""
    if text is None:
        return None
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        channels = ()
    if len(channels) < 2 or any(c <= 0 or c % 8 for c in channels):
        raise click.BadParameter(f"{text!r}: expected at least two comma-separated positive multiples of 8, e.g. 32,64,64",
                                 param_hint="--channels")
    return channels


@click.command("au-adapter")
@_common_options
@click.option("--num-tokens", type=int, default=4, show_default=True, help="AU tokens the MLP produces.")
@click.option("--hidden-dim", type=int, default=256, show_default=True)
@click.option("--drop-rate", type=float, default=0.05, show_default=True,
              help="Share of samples with no text, with no AUs, and with neither (each), for classifier-free guidance.")
@_loss_weight_options
def train_au_adapter_cmd(num_tokens, hidden_dim, drop_rate, expression_focus, snr_gamma, **kw):
    """Train the AU adapter (paper 4.2.2) with the diffusion model frozen; writes au_adapter.* into OUT."""
    plugin, opts = _options(kw, dict(num_tokens=num_tokens, hidden_dim=hidden_dim, drop_rate=drop_rate,
                                     expression_focus=expression_focus, snr_gamma=snr_gamma))
    if opts.data is None or not opts.model:
        raise click.UsageError("--data FETEXT_DIR and --model MODEL_DIR (a trained generator) are required")
    result = _trainer(plugin, "train_au_adapter")(opts)
    click.echo(f"AU adapter written to {result}")


@click.command("vae")
@_common_options
def train_vae_cmd(**kw):
    """Train a VAE for a latent model; a pixel-space model has none (skipped)."""
    plugin, opts = _options(kw, {})
    result = _trainer(plugin, "train_vae")(opts)
    if result is None:
        return
    click.echo(f"VAE written to {result}")


@click.command("approx-decoder")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A latent diffusion model folder (with vae/) whose VAE decoder is distilled.")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="FEText folder: its images, encoded once by the VAE, are what the decoder learns on.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default MODEL/approx_decoder, where semantic_guidance.decoder: approx looks).")
@click.option("--size", type=int, default=64, show_default=True,
              help="Output side in pixels: what the guidance classifier reads (64 for tiny-cnn and fer-minixception).")
@click.option("--width", type=int, default=64, show_default=True, help="Channels of the convolutions.")
@click.option("--iters", type=int, default=2000, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--classifier", default=None,
              help="Guidance-classifier plugin (e.g. tiny-cnn) whose gradient the decoder also learns to pass as the VAE does: "
                   "what guidance reads. Default: pixels only.")
@click.option("--gradient-weight", type=float, default=1.0, show_default=True, help="Weight of that gradient term (with --classifier).")
@click.option("--draws", type=click.IntRange(min=1), default=1, show_default=True,
              help="x0 estimates drawn per training face (each at a fresh timestep, noise and class).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Checkpoints, logs, latent cache (default OUT/work).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in the work dir.")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads.")
@click.option("--log-interval", type=int, default=100, show_default=True)
def train_approx_decoder_cmd(model, data, out, size, width, iters, batch_size, lr, seed, classifier, gradient_weight, draws, work_dir, resume,
                             threads, log_interval):
    """Distil the model's VAE decoder into a small conv decoder for cheap guidance (semantic_guidance.decoder: approx)."""
    from synfer_plugins.sd.approx_decoder import train_approx_decoder

    try:
        folder, error = train_approx_decoder(model, data, out, size=size, width=width, iters=iters, batch_size=batch_size, lr=lr, seed=seed,
                                             classifier=classifier, gradient_weight=gradient_weight, draws=draws, work_dir=work_dir,
                                             resume=resume, threads=threads, log_interval=log_interval)
    except ValueError as exc:
        raise click.UsageError(str(exc))
    click.echo(f"approximate decoder written to {folder}; held-out error against the VAE decode at {size} px (images in [-1, 1]): "
               f"MAE {error['mae']:.4f}, RMSE {error['rmse']:.4f} (target std {error['target_std']:.4f})"
               + (f"; gradient cosine with the VAE's {error['gradient_cosine']:.3f}" if "gradient_cosine" in error else ""))


def add_commands(train: click.Group) -> None:
    for command in (train_generator_cmd, train_au_adapter_cmd, train_vae_cmd, train_approx_decoder_cmd):
        train.add_command(command)
