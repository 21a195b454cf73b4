"""One training entry for every `synfer train ...` command, on mmengine's Runner.

`run_training(model, dataset, ...)` takes an mmengine `BaseModel` whose
`forward(**batch, mode="loss")` returns `{"loss": tensor}` and a torch Dataset whose
items are dicts of tensors (stacked by torch's default collate). It gives every
trainer the same things: AdamW on the parameters that require grad, warm-up + cosine
(or constant) learning rate, gradient clipping, optional EMA, bf16 autocast, loss
logging every N iterations with an ETA, checkpoints, resume, a seed, and DDP under
`torchrun` (launcher "pytorch" whenever WORLD_SIZE is set).

Two mmengine 0.10.7 traps are handled here once:
- resume on torch >= 2.6: `torch.load` defaults to `weights_only=True`, and a
  checkpoint holds mmengine objects (the message hub's HistoryBuffer...), so the stock
  local loader raises UnpicklingError. The run's own checkpoints are loaded through a
  scheme (`synfer-run://`) whose loader uses `weights_only=False`: these are files this
  run wrote itself into its work_dir, not foreign downloads. Nothing else changes.
- registries: every Runner uses `default_scope="synfer"`, and what we build ourselves
  (optimizer wrapper, schedulers, hooks, collate) is passed as objects, not type strings.

`train_cli` is the `synfer train` click group: `generator`, `au-adapter` and `vae`
delegate to the generator plugin (`--generator`, default "sd"), which implements
`train_generator(opts)`, `train_au_adapter(opts)`, `train_vae(opts)` classmethods taking
a `TrainOptions`. No torch import at module level: `synfer --help` loads this module.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

OWN_CHECKPOINT_PREFIX = "synfer-run://"
DEFAULT_SCOPE = "synfer"


# ---------------------------------------------------------------- the generic entry


@dataclass
class TrainResult:
    model: Any  # the trained BaseModel (EMA weights copied in when EMA was on), unwrapped from DDP
    iters: int  # iteration reached
    work_dir: Path
    losses: list[tuple[int, float]] = field(default_factory=list)  # (iteration, loss) logged by this process in this run
    rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _load_own_checkpoint(filename: str, map_location=None):
    """mmengine loader for checkpoints this run wrote (see module docstring: weights_only=False on purpose)."""
    import torch

    path = os.path.expanduser(filename[len(OWN_CHECKPOINT_PREFIX):])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found; pass --resume only when the work dir holds a previous run")
    return torch.load(path, map_location=map_location, weights_only=False)


def _register_checkpoint_loader() -> None:
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes=OWN_CHECKPOINT_PREFIX, loader=_load_own_checkpoint, force=True)


def synfer_registry(name: str):
    """The scope-"synfer" child of mmengine's root registry `name` ("model", "hook", ...), created once.

    Runners here use default_scope="synfer"; mmengine then looks each type up in the
    synfer child of the root registry and falls back to the root (mmengine's own
    classes). Without the children it warns "Failed to search registry with scope
    synfer" for every build. Code that registers its own mmengine classes should take
    the registry from here: a second `Registry(..., parent=ROOT, scope="synfer")` fails.
    """
    import mmengine.registry as mmr

    roots = {r.name: r for r in vars(mmr).values() if isinstance(r, mmr.Registry) and r.parent is None}
    if name not in roots:
        raise KeyError(f"no mmengine root registry {name!r}; known: {', '.join(sorted(roots))}")
    root = roots[name]
    child = root.children.get(DEFAULT_SCOPE)  # not `or`: an empty Registry is falsy
    return child if child is not None else mmr.Registry(name, parent=root, scope=DEFAULT_SCOPE)


def _ensure_registries() -> None:
    import mmengine.registry as mmr

    for reg in vars(mmr).values():
        if isinstance(reg, mmr.Registry) and reg.parent is None:
            synfer_registry(reg.name)


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The checkpoint mmengine's CheckpointHook recorded last in `work_dir` (None if none)."""
    marker = Path(work_dir) / "last_checkpoint"
    if not marker.exists():
        return None
    path = Path(marker.read_text().strip())
    return path if path.exists() else None


def run_training(
    model,
    dataset,
    *,
    work_dir: str | Path,
    max_iters: int,
    batch_size: int = 16,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    lr_schedule: str = "cosine",  # "cosine" (to 1% of lr) or "constant", after `warmup_iters` of linear warm-up
    warmup_iters: int = 0,
    grad_clip: float | None = 1.0,
    checkpoint_interval: int | None = None,  # default: min(500, max_iters); the last iteration is always saved
    keep_checkpoints: int = 2,
    log_interval: int = 50,
    seed: int = 0,
    resume: bool = False,  # continue from the latest checkpoint in work_dir (fresh start, with a warning, if none)
    ema_momentum: float | None = None,  # e.g. 0.005: ema = (1 - m) * ema + m * param; None: no EMA
    bf16: bool = False,  # bf16 autocast for forward/loss (CPU or GPU)
    grad_checkpointing: bool = False,  # calls model.enable_gradient_checkpointing() if it has one
    num_workers: int = 0,
    collate_fn: Callable | None = None,  # default: torch's default_collate (stacks dict items)
    threads: int | None = None,  # torch.set_num_threads
    find_unused_parameters: bool = False,  # DDP: set when some trainable parameters get no gradient in a step
    name: str = "train",
) -> TrainResult:
    """Train `model` on `dataset` with mmengine's Runner; see the module docstring."""
    import logging

    import torch
    from mmengine.dataset import InfiniteSampler
    from mmengine.hooks import CheckpointHook, EMAHook, LoggerHook
    from mmengine.optim import CosineAnnealingLR, LinearLR, OptimWrapper
    from mmengine.runner import Runner
    from torch.utils.data import default_collate

    if threads:
        torch.set_num_threads(int(threads))
    _register_checkpoint_loader()
    _ensure_registries()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if grad_checkpointing:
        if hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        else:
            logging.getLogger(__name__).warning("%s has no enable_gradient_checkpointing(); flag ignored", type(model).__name__)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True: nothing to train")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    optim_wrapper = (_AutocastOptimWrapper if bf16 else OptimWrapper)(
        optimizer=optimizer, clip_grad=dict(max_norm=grad_clip) if grad_clip else None)

    schedulers = []
    warmup_iters = max(0, min(int(warmup_iters), max_iters - 1))
    if warmup_iters:
        schedulers.append(LinearLR(optim_wrapper, start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters))
    if lr_schedule == "cosine":
        schedulers.append(CosineAnnealingLR(optim_wrapper, by_epoch=False, begin=warmup_iters, end=max_iters, T_max=max_iters - warmup_iters,
                                            eta_min=lr * 0.01))
    elif lr_schedule != "constant":
        raise ValueError(f"lr_schedule={lr_schedule!r}; expected 'cosine' or 'constant'")

    history = _LossHistory()
    custom_hooks: list = [history]
    if ema_momentum:
        custom_hooks.append(_EMAHook(momentum=float(ema_momentum), update_buffers=False))

    load_from = None
    if resume:
        last = latest_checkpoint(work_dir)
        if last is None:
            logging.getLogger(__name__).warning("--resume: no checkpoint in %s; starting from iteration 0", work_dir)
            resume = False
        else:
            load_from = OWN_CHECKPOINT_PREFIX + str(last)

    distributed = "WORLD_SIZE" in os.environ
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if distributed and backend == "gloo" and not torch.distributed.is_initialized():
        # mmengine's init_dist("pytorch") calls torch.cuda.set_device: on CPU-only torch, start gloo ourselves
        torch.distributed.init_process_group("gloo")
    runner = Runner(
        model=model,
        work_dir=str(work_dir),
        experiment_name=f"{name}_{uuid.uuid4().hex[:8]}",  # unique: no logger/message hub shared between runs in one process
        default_scope=DEFAULT_SCOPE,
        train_dataloader=dict(
            dataset=dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0,
            sampler=dict(type=InfiniteSampler, shuffle=True), collate_fn=collate_fn or default_collate),
        train_cfg=dict(by_epoch=False, max_iters=int(max_iters)),
        optim_wrapper=optim_wrapper,
        param_scheduler=schedulers or None,
        default_hooks=dict(
            logger=LoggerHook(interval=log_interval),
            checkpoint=CheckpointHook(interval=int(checkpoint_interval or min(500, max_iters)), by_epoch=False,
                                      max_keep_ckpts=keep_checkpoints, save_last=True),
        ),
        custom_hooks=custom_hooks,
        log_processor=dict(by_epoch=False, window_size=max(1, log_interval)),
        resume=resume,
        load_from=load_from,
        randomness=dict(seed=seed),
        launcher="pytorch" if distributed else "none",
        cfg=dict(model_wrapper_cfg=dict(  # read by Runner.wrap_model under torchrun; CPU DDP takes no device ids
            type="MMDistributedDataParallel", broadcast_buffers=False, find_unused_parameters=find_unused_parameters,
            **({} if backend == "nccl" else {"device_ids": None}))),
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend=backend),
                     mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0)),
        log_level="INFO",
    )
    runner.train()
    trained = runner.model.module if hasattr(runner.model, "module") else runner.model
    for hook in runner.hooks:
        if isinstance(hook, EMAHook) and hook.ema_model is not None:  # deploy the averaged weights
            with torch.no_grad():
                for p_avg, p in zip(hook.ema_model.module.parameters(), trained.parameters()):
                    p.copy_(p_avg)
    return TrainResult(trained, runner.iter, work_dir, history.losses, rank=runner.rank)


def _autocast_wrapper_class():
    from contextlib import contextmanager

    import torch
    from mmengine.optim import OptimWrapper

    class AutocastOptimWrapper(OptimWrapper):
        """OptimWrapper that runs forward + loss under bf16 autocast on the model's device (no grad scaler needed)."""

        @contextmanager
        def optim_context(self, model):
            device = next(model.parameters()).device.type
            with super().optim_context(model), torch.autocast(device_type=device, dtype=torch.bfloat16):
                yield

    return AutocastOptimWrapper


class _LazyClass:
    """Defers building a class that subclasses an mmengine one until first use (no import at module load)."""

    def __init__(self, factory):
        self.factory, self.cls = factory, None

    def __call__(self, *args, **kwargs):
        if self.cls is None:
            self.cls = self.factory()
        return self.cls(*args, **kwargs)


_AutocastOptimWrapper = _LazyClass(_autocast_wrapper_class)


def _loss_history_class():
    from mmengine.hooks import Hook

    class LossHistory(Hook):
        """Keeps (iteration, loss) of every training iteration of this process."""

        priority = "LOW"

        def __init__(self):
            self.losses: list[tuple[int, float]] = []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if outputs and "loss" in outputs:
                loss = outputs["loss"]
                self.losses.append((runner.iter + 1, float(loss.detach() if hasattr(loss, "detach") else loss)))

    return LossHistory


_LossHistory = _LazyClass(_loss_history_class)


def _ema_hook_class():
    from mmengine.hooks import EMAHook
    from mmengine.model import ExponentialMovingAverage, is_model_wrapper

    class SynferEMAHook(EMAHook):
        """mmengine's EMAHook, building its ExponentialMovingAverage directly instead of through the registry."""

        def __init__(self, momentum: float, update_buffers: bool = False):
            super().__init__(momentum=momentum, update_buffers=update_buffers)
            self._ema_kwargs = dict(momentum=momentum, update_buffers=update_buffers)

        def before_run(self, runner) -> None:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            self.src_model = model
            self.ema_model = ExponentialMovingAverage(model, **self._ema_kwargs)

    return SynferEMAHook


_EMAHook = _LazyClass(_ema_hook_class)


# ---------------------------------------------------------------- the command line


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
    extra: dict[str, Any] = field(default_factory=dict)  # subcommand-specific options

    @property
    def run_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.out) / "work"


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
        click.option("--generator", "plugin", default="sd", show_default=True, help="Generator plugin that trains the model."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _options(kw: dict, extra: dict) -> tuple[str, TrainOptions]:
    plugin = kw.pop("plugin")
    return plugin, TrainOptions(**kw, extra=extra)


def _trainer(plugin: str, method: str):
    from synfer.plugins import PluginError, get_registry

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


@click.group("train")
def train_cli():
    """Train the models of the method (runs under torchrun for several GPUs)."""


@train_cli.command("generator")
@_common_options
@click.option("--caption-dropout", type=float, default=0.1, show_default=True, help="Share of empty captions (for classifier-free guidance).")
@click.option("--train-text-encoder/--freeze-text-encoder", default=None, help="Default: trained for the tiny model, frozen for real SD.")
@click.option("--size", type=int, default=None, help="Tiny model resolution (default 32).")
@_loss_weight_options
def train_generator_cmd(caption_dropout, train_text_encoder, size, expression_focus, snr_gamma, **kw):
    """Fine-tune the diffusion model on FEText with the noise-prediction loss (paper Eq. 3)."""
    plugin, opts = _options(kw, dict(caption_dropout=caption_dropout, train_text_encoder=train_text_encoder, size=size,
                                     expression_focus=expression_focus, snr_gamma=snr_gamma))
    if opts.data is None:
        raise click.UsageError("--data FETEXT_DIR is required")
    result = _trainer(plugin, "train_generator")(opts)
    click.echo(f"generator written to {result}")


@train_cli.command("au-adapter")
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


@train_cli.command("vae")
@_common_options
def train_vae_cmd(**kw):
    """Train a VAE for a latent model; a pixel-space model has none (skipped)."""
    plugin, opts = _options(kw, {})
    result = _trainer(plugin, "train_vae")(opts)
    if result is None:
        return
    click.echo(f"VAE written to {result}")


@train_cli.command("calibrator")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="FEText folder (train identities).")
@click.option("--model", required=True, help="The generator folder whose UNet FERAnno reads (frozen).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="FERAnno folder, e.g. plugins/models/feranno.")
@click.option("--test", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Held-out FEText: report accuracy and UAR.")
@click.option("--iters", type=int, default=800, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--dim", type=int, default=64, show_default=True, help="Channels of the dual-branch encoder.")
@click.option("--condition", type=click.Choice(["generic", "sample"]), default="generic", show_default=True,
              help="Conditions of the UNet pass: one expression-free prompt with zero AUs, or each sample's own.")
@click.option("--pool", type=int, default=4, show_default=True, help="Grid each scale is pooled to before the head (1: global average).")
@click.option("--max-res", type=int, default=8, show_default=True,
              help="Finer feature maps are average-pooled to this side first (the shipped FERAnno: 16, +6 points, ~3.5x the CPU time per face).")
@click.option("--order", type=click.Choice(["coarse-to-fine", "fine-to-coarse"]), default="fine-to-coarse", show_default=True,
              help="Direction the encoder carries its state between scales (fine-to-coarse: a CNN-like pyramid; +1 to +2.5 points).")
@click.option("--timestep", type=int, default=1, show_default=True, help="Eq. 1 timestep the faces are noised to before the UNet pass (paper: 1).")
@click.option("--device", default=None, help="Where the UNet pass and the encoder run (default: cuda if there is one, else cpu).")
@click.option("--no-cache", is_flag=True, help="Do not keep the extracted UNet features in OUT/work (they are extracted once either way).")
@click.option("--views", type=int, default=1, show_default=True,
              help="Captures per training face: 1 + (views - 1) copies shifted by up to 2 px (augmentation for cached features).")
@click.option("--mixup", type=float, default=0.0, show_default=True,
              help="Mix pairs of cached captures and their labels with a Beta(a, a) weight (augmentation for cached features); 0: off.")
@click.option("--limit", type=int, default=None)
@click.option("--label-space", default="affectnet8", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True)
@click.option("--threads", type=int, default=None)
def train_calibrator_cmd(data, model, out, test, iters, batch_size, lr, dim, condition, pool, max_res, order, timestep, device, no_cache, views, mixup,
                         limit, label_space, seed, resume, threads):
    """Train FERAnno (paper 4.4) on FEText with the generator's UNet frozen."""
    import json

    from synfer.plugins import get_registry

    trainer = get_registry().get("calibrator", "feranno")
    _, _, metrics = trainer.train(data, model, out, test=test, iters=iters, batch_size=batch_size, lr=lr, seed=seed,
                                  label_space=label_space, dim=dim, condition=condition, limit=limit, resume=resume, threads=threads,
                                  pool=pool, max_res=max_res, t=timestep, order=order, device=device, cache=not no_cache, views=views, mixup=mixup)
    click.echo(f"written to {out}")
    if metrics:
        click.echo(json.dumps(metrics, indent=2))
