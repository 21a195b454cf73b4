"""Layout initialization (paper 4.3) and semantic guidance (Eq. 4-6) for the `sd` generator.

Both act on one batch through the generator's public hooks: `LayoutInit` produces x_t and
the step to start denoising from; `SemanticGuidance` is the per-step callback that moves
the text embedding. Gradients flow to the text embedding only, never to model weights.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from synfer import labels as L
from synfer.contract.guidance_contract import guidance_targets
from synfer.engine.seeds import stream_rng
from synfer_plugins.sd.prediction import prediction_type, split_prediction


# Guided backward per 4 samples: SD 1.5 keeps 2.06 GiB of activations per image at 256 px fp32 (bench/README.md),
# ~4.1 GiB at 512 px bf16 (4x the pixels, half the bytes), so ~16 GiB per micro-batch: fits a 24 GiB GPU beside
# the weights; raise it on larger cards (32 at once would need ~130 GiB).
MICRO_BATCH = 4


class LayoutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    source: str | None = None  # FEText folder (synfer dataset format) to draw layout faces from
    depth: float = Field(0.6, gt=0, le=1)  # fraction of the DDIM steps inverted (1.0: all the way to x_T)
    expressions: list[str] | str | None = ["neutral"]  # draw only faces of these classes (None: any;
    # "match": a face of the sample's own preassigned class)
    prompt: str = "a photo of a person"  # inversion runs with this prompt, zero AUs and CFG 1 (drift-free)
    inversion_steps: int | None = Field(None, ge=1)  # UNet calls to invert down to the depth, on a coarser grid ending at
    # the sampler's first step (None: one per sampler step, depth x steps)
    cache_mb: float = Field(256, ge=0)  # inverted faces kept in RAM (least recently used out first): a face drawn again skips its
    # inversion, with the same bytes (a face's x_t depends on its batch's shape, never on its neighbours). 0: off
    bank: bool = True  # inverted faces also kept on disk, in SOURCE/work/layout-<key>/ (keyed by model, source and every setting
    # the bytes depend on): reruns, resumes, other recipes on the same source and torchrun ranks skip them (layout_bank.py)


class GuidanceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True  # on whenever the recipe names a guidance_classifier
    start: float = Field(0.3, ge=0, le=1)  # fraction of the steps after which guidance runs
    stop: float = Field(1.0, ge=0, le=1)  # fraction of the steps before which it runs (1: to the last step)
    every: int = Field(1, ge=1)  # guide every k-th step of the window, counted from its first step (1: every step)
    lambda_g: float = Field(1.0, ge=0)  # Eq. 6 step size on the (per-sample normalised) gradient
    updates: int = Field(1, ge=1)  # gradient steps on the embedding per denoising step
    micro_batch: int | None = Field(MICRO_BATCH, ge=1)  # samples per guided backward (activation memory grows with it;
    # bench/README.md); the update is the same as one pass over the batch. None: the whole batch at once
    decoder: Literal["vae", "approx"] = "vae"  # x0 -> image for Eq. 5: "vae" (exact) or "approx" ('synfer train approx-decoder')
    # "approx" reads MODEL/approx_decoder/, a small conv net distilled from the VAE that outputs the classifier's 64 px face
    # directly (latent models only); the VAE decode is 75% of a guided update's FLOPs at 512 px (bench/README.md)
    reuse_forward: bool = False  # the guided step's own UNet forward (the embedding before its update) also denoises that step,
    # as the conditional half of a classifier-free pair: one forward fewer per guided step; the update acts from the next step


class LayoutInit:
    """Invert a random FEText face to x_t with DDIM inversion and start denoising there (4.3).

    The inversion ignores the sample (the layout prompt, zero AUs), so each face's x_t is kept, keyed by
    (face, batch shape), and reused when the face is drawn again: nearly half the UNet calls of a sample are the
    inversion's, and a long run draws each face many times (10,000 samples from 1,024 faces: ~10 each).
    Faces not yet inverted run together in batches of the chunk's own shape, which gives the bytes each would have
    had in its own chunk (docs/results.md, Speed: "which setting changes the bytes"); the padding slots invert faces
    of the source not drawn yet, so a run longer than its source inverts each face once, in full batches. With
    `bank` on, inverted faces also go to disk (`LayoutBank`), and any later run reads them back with the same bytes.
    """

    def __init__(self, generator, config: LayoutConfig):
        from synfer.engine.dataset import read_metadata, row_label

        if not config.source:
            raise ValueError("generator.layout.enabled is true but generator.layout.source is empty: "
                             "give a FEText folder, e.g. generator.layout.source=out/fetext")
        self.gen, self.cfg = generator, config
        self.root = Path(config.source)
        rows = read_metadata(self.root)
        self.by_class: dict[str, list[str]] = {}
        if config.expressions == "match":
            for r in rows:
                if row_label(r):
                    self.by_class.setdefault(row_label(r), []).append(r["file_name"])
        elif isinstance(config.expressions, str):
            raise ValueError(f"generator.layout.expressions={config.expressions!r}: expected a list of classes, null or 'match'")
        elif config.expressions:
            wanted = {L.canonical(e) for e in config.expressions}
            rows = [r for r in rows if row_label(r) in wanted] or rows
        if not rows:
            raise ValueError(f"layout source {self.root} holds no images")
        self.files = [r["file_name"] for r in rows]
        self.inverted: OrderedDict = OrderedDict()  # (file, batch shape) -> x_t, least recently used first
        self.inversions = self.reuses = 0  # faces inverted / slots filled from the cache
        self.memory_format = None  # of the inverted x_t, set by the first inversion
        self._unvisited = list(reversed(self.files))  # faces never used to pad a batch, next one last
        self._bank = None  # opened at the first batch, when the model (and so the bank's key) is known

    def pick(self, request) -> str:
        files = self.by_class.get(L.canonical(request.expression)) or self.files
        return files[int(stream_rng(request.seed, "layout.pick").integers(len(files)))]

    def load_images(self, files, size: int):
        import numpy as np
        import torch
        from PIL import Image

        arrs = []
        for f in files:
            with Image.open(self.root / f) as im:
                arrs.append(np.asarray(im.convert("RGB").resize((size, size), Image.LANCZOS), dtype=np.float32))
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) / 127.5 - 1.0

    def num_inverted(self, steps: int) -> int:
        return max(1, min(steps, int(round(self.cfg.depth * steps))))

    def __call__(self, requests):
        """-> (x_t for the batch, start_step). Sets each request's `layout_source`."""
        import torch

        for r in requests:
            r.layout_source = self.pick(r)
        files, shape = [r.layout_source for r in requests], len(requests)
        num = self.num_inverted(self.gen.config.steps)
        bank = self.bank()
        have = {}  # faces inverted before: in RAM, or on disk
        for f in dict.fromkeys(files):
            if (f, shape) in self.inverted:
                have[f] = self._reuse((f, shape))
            elif (got := bank.get(f, shape)) is not None:
                have[f], self.memory_format = got
                self._keep((f, shape), have[f])
        fresh = [f for f in dict.fromkeys(files) if f not in have]
        self.reuses += sum(f in have for f in files)
        made = {}
        for j in range(0, len(fresh), shape):
            part = fresh[j:j + shape]
            part += self._ahead(shape - len(part), shape, set(fresh))  # the padding inverts faces not drawn yet, for free
            part += [part[0]] * (shape - len(part))  # (copies when none are left)
            x_t, _ = invert(self.gen, self.load_images(part, self.gen.size), [self.cfg.prompt] * shape, None, num,
                            calls=self.cfg.inversion_steps)
            made.update(zip(part, x_t))
            self.inversions += len(set(part))
            # denoising reads x_t's memory format (channels-last from a channels-last UNet): the bytes follow it
            self.memory_format = torch.channels_last if x_t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        device = next(iter(made.values())).device if made else self.gen.load().device
        out = torch.stack([made[f] if f in made else have[f].to(device) for f in files])
        out = out.contiguous(memory_format=self.memory_format)
        for f, x in made.items():
            self._keep((f, shape), x)
            bank.put(f, shape, x, self.memory_format)
        return out, self.gen.config.steps - num

    def bank(self):
        """The on-disk bank of this source, model and settings (one that holds nothing when `bank` is off)."""
        if self._bank is None:
            import torch

            from synfer_plugins.sd.layout_bank import LayoutBank, bank_key

            if not self.cfg.bank:
                self._bank = LayoutBank(None)
                return self._bank
            m, c = self.gen.load(), self.gen.config
            num = self.num_inverted(c.steps)
            settings = dict(steps=c.steps, inverted=num, calls=min(self.cfg.inversion_steps or num, num), scheduler=c.scheduler,
                            prompt=self.cfg.prompt, size=self.gen.size, au_scale=c.au_scale, dtype=m.dtype, forward_dtype=m.forward_dtype,
                            channels_last=c.channels_last, device=m.device.type, cpu=torch.backends.cpu.get_cpu_capability(),
                            threads=torch.get_num_threads() if m.device.type == "cpu" else 0, torch=torch.__version__)
            self._bank = LayoutBank.open(self.root, bank_key(self.gen.model_path, self.root, settings))
        return self._bank

    def _ahead(self, n: int, shape: int, taken: set) -> list[str]:
        """Up to n faces of the source not inverted yet (in folder order), to fill a batch's padding slots: a long
        run then inverts each face once, in full batches, instead of paying a whole batch for a few new faces."""
        if self.cfg.cache_mb <= 0 and self.bank().folder is None:
            return []
        out = []
        while len(out) < n and self._unvisited:
            f = self._unvisited.pop()
            if f not in taken and (f, shape) not in self.inverted and not self.bank().holds(f, shape):
                out.append(f)
        return out

    def _reuse(self, key):
        self.inverted.move_to_end(key)
        return self.inverted[key]

    def _keep(self, key, x) -> None:
        budget = self.cfg.cache_mb * 2**20
        per = x.numel() * x.element_size()
        if per > budget:
            return
        self.inverted[key] = x.to("cpu", copy=True)  # a copy: not a view that keeps the whole batch (or GPU memory) alive
        while len(self.inverted) * per > budget:
            self.inverted.popitem(last=False)


def coarse_grid(grid, calls: int):
    """`calls` of the ascending timesteps `grid`, evenly spread and always ending at its last (the level
    denoising starts from)."""
    n = len(grid)
    return grid[[(j + 1) * n // calls - 1 for j in range(calls)]] if calls < n else grid


def invert(generator, images, prompts, aus, num_steps: int, steps: int | None = None, calls: int | None = None):
    """DDIM inversion of images for `num_steps` of the sampler's `steps`, guidance 1 (no CFG, which
    keeps inversion from drifting), ending exactly at the sampler's `timesteps[start_step]`:
    -> (x_t, start_step) such that generator.denoise(x_t, ..., start_step=start_step) continues.

    With `scheduler: ddim` this is diffusers' DDIMInverseScheduler on DDIM's own grid. The multistep
    solvers space their timesteps differently, so the same DDIM inversion step runs on the solver's
    grid instead (`ddim_invert_onto`); that measured better than DPM-Solver++'s own inverse
    scheduler (docs/results.md, Speed). `calls` below `num_steps` inverts through `calls` of those
    timesteps (`coarse_grid`): fewer UNet calls, the same end point."""
    import torch
    from diffusers import DDIMInverseScheduler

    m = generator.load()
    steps = steps or generator.config.steps
    with torch.no_grad():
        latents = m.encode_image(images.to(device=m.device, dtype=m.dtype))
        text = m.encode_text(prompts)
        au_t = aus if aus is not None or m.au_adapter is None else torch.zeros(len(prompts), len(L.AU_KEYS), device=m.device, dtype=m.dtype)
        calls = min(calls or num_steps, num_steps)
        if getattr(generator.config, "scheduler", "ddim") != "ddim" or calls < num_steps:
            grid = generator.timesteps(steps)[steps - num_steps:].flip(0)  # the sampler's timesteps up to timesteps[start_step]
            return ddim_invert_onto(m, latents, coarse_grid(grid, calls), text, au_t), steps - num_steps
        inverse = DDIMInverseScheduler.from_config(m.scheduler.config)
        inverse.set_timesteps(steps, device=m.device)
        for t in inverse.timesteps[:num_steps]:
            eps = m.predict_noise(inverse.scale_model_input(latents, t), t, text, au_t, no_grad_pass=True)
            latents = inverse.step(eps, t, latents).prev_sample
    return latents, steps - num_steps


def ddim_invert_onto(m, latents, grid, text, aus):
    """DDIM inversion through the ascending timesteps `grid`: DDIMInverseScheduler.step's arithmetic
    (the noise predicted at the level reached, x0 clipped as the config says) with uneven strides."""
    cfg = m.scheduler.config
    kind = prediction_type(m.scheduler)
    alphas = m.scheduler.alphas_cumprod
    a_prev = alphas.new_tensor(1.0) if cfg.set_alpha_to_one else alphas[0]  # the clean image's level, as DDIMInverseScheduler
    for t in grid:
        a_t = alphas[int(t)]
        out = m.predict_noise(latents, t, text, aus, no_grad_pass=True)
        x0, eps = split_prediction(out, latents, a_prev, kind)  # read at the level of `latents`, as DDIMInverseScheduler.step
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        latents = a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps
        a_prev = a_t
    return latents


def guided_window(config: GuidanceConfig, steps: int) -> tuple[int, int]:
    """(first guided step, first step after the window) of `steps` denoising steps."""
    return int(round(config.start * steps)), int(round(config.stop * steps))


class SemanticGuidance:
    """Eq. 4-6 as a denoising-step callback for one batch.

    From step `start` on: x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) (Eq. 4; prediction.py for v- and x0-models), decode, classify,
    L_g = CE(f(x0), y) (Eq. 5), c <- c - lambda_g * grad / ||grad|| per sample (Eq. 6, the
    direction that lowers L_g). Samples whose class the classifier cannot see are left alone.
    """

    def __init__(self, generator, classifier, requests, aus, config: GuidanceConfig):
        import torch

        self.gen, self.clf, self.cfg = generator, classifier, config
        targets, mask = guidance_targets(classifier, requests)  # marks the requests it cannot guide (metadata `guided: false`)
        self.targets = torch.tensor(targets)
        self.mask = torch.tensor(mask, dtype=torch.float32)
        self.aus = aus
        self.start_step, self.stop_step = guided_window(config, generator.config.steps)
        self.decode = approx_decoder(generator) if config.decoder == "approx" else None  # None: the model's own decode

    def guides(self, i: int) -> bool:
        """Whether denoising step i is guided: in [start, stop) of the steps, every `every`-th from start."""
        return self.start_step <= i < self.stop_step and (i - self.start_step) % self.cfg.every == 0

    def __call__(self, i, t, latents, text_emb):
        import torch

        if not self.guides(i) or not bool(self.mask.any()):
            return None
        m = self.gen.load()
        c = text_emb.detach()
        mask = self.mask.to(c.device, c.dtype).view(-1, 1, 1)
        step = self.cfg.micro_batch or c.shape[0]
        eps = None
        for _ in range(self.cfg.updates):
            # each sample's loss depends on its own inputs only, so the gradient is computed per micro-batch:
            # the same update as one pass, with the activations of `micro_batch` samples alive at a time
            parts = [self._grad(m, t, latents[sl], c[sl], sl) for sl in
                     (slice(j, j + step) for j in range(0, c.shape[0], step))]
            grad = torch.cat([g for g, _ in parts])
            eps = torch.cat([e for _, e in parts]) if eps is None and self.cfg.reuse_forward else eps
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
            c = (c - self.cfg.lambda_g * mask * grad / norm).detach()  # Eq. 6
        return (c, eps) if self.cfg.reuse_forward else c

    def _grad(self, m, t, latents, c, sl: slice):
        """(d L_g / d c, the noise predicted with c: detached, or None) for the samples `sl` of the batch (Eq. 4-5)."""
        import torch
        import torch.nn.functional as F

        aus = self.aus[sl] if self.aus is not None else None
        if not bool(self.mask[sl].any()):
            if not self.cfg.reuse_forward:
                return torch.zeros_like(c), None
            with torch.no_grad():
                return torch.zeros_like(c), m.predict_noise(m.scheduler.scale_model_input(latents, t), t, c, aus)
        c = c.clone().requires_grad_(True)
        with torch.enable_grad():
            out = m.predict_noise(m.scheduler.scale_model_input(latents, t), t, c, aus)
            x0, _ = m.to_x0_eps(out, latents, t)  # Eq. 4 (for an epsilon model; v- and x0-models likewise: prediction.py)
            image = (self.decode(x0) if self.decode is not None else m.decode(x0)).clamp(-1, 1)
            logits = self.clf.forward(image.float())
            # Eq. 5, summed so that each sample's gradient is its own (batch-size independent)
            loss = F.cross_entropy(logits, self.targets[sl].to(logits.device), reduction="none").mul(self.mask[sl].to(logits.device)).sum()
            (grad,) = torch.autograd.grad(loss, c)
        return grad, (out.detach() if self.cfg.reuse_forward else None)  # the model's output, as denoising uses it


def approx_decoder(generator):
    """The generator's model's ApproxDecoder (approx_decoder.py), loaded once per generator."""
    net = getattr(generator, "_approx_decoder", None)
    if net is None:
        from synfer_plugins.sd.approx_decoder import load_for

        m = generator.load()
        if m.vae is None:
            raise ValueError(f"semantic_guidance.decoder: approx, but {generator.model_path} is a pixel-space model: its latents are "
                             "the image already. Use decoder: vae (no decoding happens) or a latent model.")
        net = load_for(generator.model_path, device=m.device, dtype=m.dtype)
        generator._approx_decoder = net
    return net
