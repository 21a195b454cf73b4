"""One training entry for every `synfer train ...` command, on mmengine's Runner.

`run_training(model, dataset, ...)` takes an mmengine `BaseModel` whose
`forward(**batch, mode="loss")` returns `{"loss": tensor}` and a torch Dataset whose
items are dicts of tensors (stacked by torch's default collate). It gives every
trainer the same things: AdamW (or bitsandbytes' 8-bit AdamW on CUDA) on the parameters that
require grad, gradient accumulation (mmengine's `accumulative_counts`; `max_iters` counts optimizer
steps), warm-up + cosine (or constant) learning rate, gradient clipping, optional EMA, bf16 autocast, loss
logging every N iterations with an ETA, checkpoints, resume, a seed, and DDP under
`torchrun` (launcher "pytorch" whenever WORLD_SIZE is set).

Repeatable and resumable: every iteration starts with python, numpy and torch seeded from
(seed, iteration, rank) (`iteration_seed`), and the data order comes from mmengine's seeded
InfiniteSampler, which a resume advances to the checkpoint's iteration; so a run killed after a
checkpoint and resumed ends with the weights of an uninterrupted run. A truncated latest
checkpoint falls back to the previous intact one (`latest_checkpoint`).

Two mmengine 0.10.7 traps are handled here once:
- resume on torch >= 2.6: `torch.load` defaults to `weights_only=True`, and a
  checkpoint holds mmengine objects (the message hub's HistoryBuffer...), so the stock
  local loader raises UnpicklingError. The run's own checkpoints are loaded through a
  scheme (`synfer-run://`) whose loader uses `weights_only=False`: these are files this
  run wrote itself into its work_dir, not foreign downloads. Nothing else changes.
- registries: every Runner uses `default_scope="synfer"`, and what we build ourselves
  (optimizer wrapper, schedulers, hooks, collate) is passed as objects, not type strings.

The `synfer train` click group is synfer.commands.train; its subcommands come from the plugins that
train something (hook `register_commands`).
No torch import at module level: `synfer --help` loads this module.
"""
from __future__ import annotations

import logging
import os
import random
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from synfer.engine.checkpoints import (  # noqa: F401  (resume looks here; tests and plugins import it from synfer.engine.training)
    latest_checkpoint,
)
from synfer.engine.faults import crash_point
from synfer.engine.logs import runner_class
from synfer.engine.optimizers import make_optimizer

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
    import torch  # heavy

    path = os.path.expanduser(filename[len(OWN_CHECKPOINT_PREFIX):])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found; pass --resume only when the work dir holds a previous run")
    return torch.load(path, map_location=map_location, weights_only=False)


def _register_checkpoint_loader() -> None:
    from mmengine.runner.checkpoint import CheckpointLoader  # heavy

    CheckpointLoader.register_scheme(prefixes=OWN_CHECKPOINT_PREFIX, loader=_load_own_checkpoint, force=True)


def synfer_registry(name: str):
    """The scope-"synfer" child of mmengine's root registry `name` ("model", "hook", ...), created once.

    Runners here use default_scope="synfer"; mmengine then looks each type up in the
    synfer child of the root registry and falls back to the root (mmengine's own
    classes). Without the children it warns "Failed to search registry with scope
    synfer" for every build. Code that registers its own mmengine classes should take
    the registry from here: a second `Registry(..., parent=ROOT, scope="synfer")` fails.
    """
    import mmengine.registry as mmr  # heavy

    roots = {r.name: r for r in vars(mmr).values() if isinstance(r, mmr.Registry) and r.parent is None}
    if name not in roots:
        raise KeyError(f"no mmengine root registry {name!r}; known: {', '.join(sorted(roots))}")
    root = roots[name]
    child = root.children.get(DEFAULT_SCOPE)  # not `or`: an empty Registry is falsy
    return child if child is not None else mmr.Registry(name, parent=root, scope=DEFAULT_SCOPE)


def _ensure_registries() -> None:
    import mmengine.registry as mmr  # heavy

    for reg in vars(mmr).values():
        if isinstance(reg, mmr.Registry) and reg.parent is None:
            synfer_registry(reg.name)


def iteration_seed(seed: int, iteration: int, rank: int = 0) -> int:
    """The seed of one training iteration: every random draw of the step (noise, timesteps, dropout,
    augmentation) depends on (seed, iteration, rank) only, so a resumed run draws what an uninterrupted one does."""
    return int(np.random.SeedSequence([int(seed), int(iteration), int(rank)]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device): call before building a model so its initial weights follow --seed."""
    import torch  # heavy

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


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
    keep_checkpoints: int = 2,  # at least 2 are kept: a truncated latest checkpoint falls back to the previous one
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
    grad_accum: int = 1,  # micro-batches per optimizer step (mmengine's accumulative_counts); max_iters counts optimizer steps
    optimizer: str = "adamw",  # "adamw" (torch) or "adamw8bit" (bitsandbytes, CUDA only): make_optimizer
) -> TrainResult:
    """Train `model` on `dataset` with mmengine's Runner; see the module docstring."""
    import torch  # heavy
    from mmengine.dataset import InfiniteSampler  # heavy
    from mmengine.hooks import CheckpointHook, EMAHook, LoggerHook  # heavy
    from mmengine.optim import CosineAnnealingLR, LinearLR, OptimWrapper  # heavy
    from torch.utils.data import default_collate  # heavy

    Runner = runner_class()  # mmengine's Runner; console: one progress bar unless -v, full log in work_dir

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
    accum = int(grad_accum)
    if accum < 1:
        raise ValueError(f"grad_accum={grad_accum}: expected 1 (no accumulation) or more micro-batches per optimizer step")
    # the Runner counts micro-batches: every count below is in optimizer steps, times `accum`
    optim_wrapper = (_AutocastOptimWrapper if bf16 else OptimWrapper)(
        optimizer=make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay), accumulative_counts=accum,
        clip_grad=dict(max_norm=grad_clip) if grad_clip else None)

    schedulers = []
    warmup_iters = max(0, min(int(warmup_iters), max_iters - 1))
    if warmup_iters:
        schedulers.append(LinearLR(optim_wrapper, start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters * accum))
    if lr_schedule == "cosine":
        schedulers.append(CosineAnnealingLR(optim_wrapper, by_epoch=False, begin=warmup_iters * accum, end=max_iters * accum,
                                            T_max=(max_iters - warmup_iters) * accum, eta_min=lr * 0.01))
    elif lr_schedule != "constant":
        raise ValueError(f"lr_schedule={lr_schedule!r}; expected 'cosine' or 'constant'")

    history = _LossHistory()
    custom_hooks: list = [history, _IterationSeedHook(seed)]
    if ema_momentum:  # the hook updates after every micro-batch: per optimizer step, the decay is ema_momentum's
        custom_hooks.append(_EMAHook(momentum=1 - (1 - float(ema_momentum)) ** (1 / accum), update_buffers=False))

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
        train_cfg=dict(by_epoch=False, max_iters=int(max_iters) * accum),
        optim_wrapper=optim_wrapper,
        param_scheduler=schedulers or None,
        default_hooks=dict(
            logger=LoggerHook(interval=log_interval),
            checkpoint=CheckpointHook(interval=int(checkpoint_interval or min(500, max_iters)) * accum, by_epoch=False,
                                      max_keep_ckpts=max(2, keep_checkpoints), save_last=True),
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
    return TrainResult(trained, runner.iter // accum, work_dir, history.losses, rank=runner.rank)


def _autocast_wrapper_class():
    import torch  # heavy
    from mmengine.optim import OptimWrapper  # heavy

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
    from mmengine.hooks import Hook  # heavy

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


def _iteration_seed_hook_class():
    from mmengine.hooks import Hook  # heavy

    class IterationSeedHook(Hook):
        """Before every iteration: python, numpy and torch (all devices) seeded from (seed, iteration, rank), so
        the step's random draws do not depend on what ran before (a resume ends byte-identical). After every
        iteration (lowest priority: checkpoints are written first): the test crash point "train_iter"."""

        priority = "LOWEST"

        def __init__(self, seed: int):
            self.seed = int(seed)

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            seed_everything(iteration_seed(self.seed, runner.iter, runner.rank))

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            crash_point("train_iter")

    return IterationSeedHook


_IterationSeedHook = _LazyClass(_iteration_seed_hook_class)


def _ema_hook_class():
    from mmengine.hooks import EMAHook  # heavy
    from mmengine.model import ExponentialMovingAverage, is_model_wrapper  # heavy

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


RUN_KIND_FILE = "synfer_run_kind.txt"


class WorkDirClash(ValueError):
    """A training's work folder already holds another kind of training's checkpoints."""


def kind_work_dir(out, kind: str, work_dir=None) -> Path:
    """Checkpoints and logs of one training kind: `work_dir`, or OUT/work/<kind>. Trainings that share
    --out (the generator, then its AU adapter) thus never resume or overwrite each other's iter_N.pth.
    The folder is claimed for `kind` on first use; reusing it for another kind is an error."""
    run = Path(work_dir) if work_dir else Path(out) / "work" / kind
    marker = run / RUN_KIND_FILE
    if marker.exists() and (other := marker.read_text().strip()) != kind:
        raise WorkDirClash(f"{run} holds the checkpoints of a '{other}' training, not '{kind}': resuming or continuing there would "
                               f"mix the two. Give this training its own --work-dir (or leave it unset: OUT/work/{kind}).")
    run.mkdir(parents=True, exist_ok=True)
    marker.write_text(kind + "\n")
    return run
