"""The "sd" generator stage: Stable-Diffusion-architecture sampler with text + AU conditioning (paper 4.2-4.3).

The model itself (loading, text/image encoding, one UNet pass) is `SDModel` in model.py;
layout initialization and semantic guidance are in sampling.py; training in training.py.

Sampling runs in fixed chunks: sample index i sits at position i % C of chunk i // C, and
every chunk runs as one UNet batch of exactly C = `chunk` slots (slots of samples not asked
for are filled with throwaway copies). Batched CPU kernels round differently per batch shape,
but a sample's bytes depend only on (C, its position), not on the other slots' content
(docs/results.md, Speed), so the files depend on `chunk` and not on `batch_size`, the number
of torchrun workers or a resume. Every sample's starting noise comes from its own
`torch.Generator().manual_seed(request.seed)`. Hooks for the method's other parts:
- layout initialization (4.3): pass `x_T` (e.g. a DDIM-inverted FEText face) and
  `start_step` to `denoise`/`sample`; `scheduler`, `unet`, `encode_image` are public;
- semantic guidance (Eq. 4-6): `denoise(..., on_step=fn)`; `fn(i, t, latents, text_emb)`
  runs before step i's UNet pass and may return an updated text embedding, used from
  then on (conditional branch only; the unconditional branch keeps the empty prompt).
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, ClassVar, Literal, Sequence

from pydantic import Field, model_validator

from synfer.labels import sample_seed
from synfer.stages import GeneratedSample, Generator, SampleRequest, StageConfig, missing_path
from synfer_plugins.sd.model import TINY_MODEL_DIR, SDModel
from synfer_plugins.sd.runtime import forward_dtype, model_id, native_bf16_cpu  # noqa: F401 (re-exported)
from synfer_plugins.sd.sampling import GuidanceConfig, LayoutConfig, LayoutInit, SemanticGuidance

log = logging.getLogger(__name__)

OnStep = Callable[[int, "object", "object", "object"], "object | None"]


class SDGenerator(Generator):
    """Text + AU conditioned sampler (DDIM, DPM-Solver++ or UniPC) with classifier-free guidance on a diffusers model folder."""

    name = "sd"
    licence = "MIT (the shipped tiny-sd, synfer's own; a model folder declares its own in its README.md)"
    weights_path = property(lambda self: self.model_path)  # the weights it reads, hashed into the dataset card
    backbones: ClassVar[tuple[type, ...] | None] = None  # the SDModel classes it runs (None: SD 1.x/2.x and SDXL, backbones.py);
    # a plugin adding a backbone subclasses this generator and names its own here (docs/plugins.md, "Backbones")

    class Config(StageConfig):
        model: str | None = None  # diffusers folder of SD 1.x/2.x (StableDiffusionPipeline) or SDXL (StableDiffusionXLPipeline);
        # None: the shipped tiny model (synfer_plugins/models/tiny-sd)
        steps: int = Field(25, gt=0, le=1000)  # denoising steps of `scheduler`
        scheduler: Literal["ddim", "dpm++", "unipc"] = "ddim"  # the sampler, built from the model's scheduler config:
        # DDIM, or diffusers' multistep DPM-Solver++ (2nd order) / UniPC (bh2); sweep in docs/results.md (Speed)
        guidance_scale: float = Field(4.0, ge=0)  # classifier-free guidance; uncond = empty prompt + all-zero AUs; 1 turns it off
        au_scale: float = Field(1.0, ge=0)  # weight of the AU cross-attention (0: text only); ignored without an AU adapter
        eta: float = Field(0.0, ge=0)  # DDIM eta (0: deterministic; ddim only); its noise is per sample too
        chunk: int = Field(16, gt=0, le=4096)  # UNet batch shape, padded when short: the one batching setting that changes the bytes
        # (1 = one sample per UNet call, the retired exact_batching=true); docs/results.md, Speed
        batch_size: int = Field(16, gt=0)  # samples per generate() call, rounded up to whole chunks; never changes the bytes
        device: str = "auto"  # "auto": cuda if available, else cpu
        dtype: Literal["float32", "bfloat16", "float16"] = "float32"
        forward_dtype: Literal["auto", "bfloat16", "float16"] | None = "auto"  # the gradient-free UNet passes (denoising,
        # layout inversion) under autocast to it; guided steps keep `dtype`. auto: bfloat16 on a float32 CPU model where the
        # CPU computes bf16 natively (AVX512-BF16 or AMX; SYNFER_NATIVE_BF16=1 or 0 answers instead), else none. Changes
        # the bytes: the same recipe on an AVX2 and a BF16 CPU writes different files. docs/results.md, Speed
        size: int | None = None  # output side in pixels; None: the model's native size
        channels_last: bool = True  # UNet (and VAE) in channels-last memory: 11-13% faster per UNet call on CPU (docs/results.md, Speed)
        nan_retries: int = Field(2, ge=0)  # a non-finite sample is redrawn from derived seeds this often, then dropped
        layout: LayoutConfig = LayoutConfig()  # layout initialization (paper 4.3)
        semantic_guidance: GuidanceConfig = GuidanceConfig()  # Eq. 4-6, active when the recipe names a guidance_classifier

        @model_validator(mode="before")
        @classmethod
        def _retired(cls, data):
            if isinstance(data, dict) and "exact_batching" in data:
                raise ValueError(
                    "generator.exact_batching was retired: samples now run in fixed chunks of generator.chunk (default 16) "
                    "and the files depend on chunk alone, never on batch_size. Delete exact_batching from the recipe or "
                    "override; exact_batching=true (one sample per UNet call, the old bytes) is generator.chunk=1, "
                    "exact_batching=false (the UNet batched for speed) is generator.chunk=<your batch_size>.")
            return data

    def __init__(self, config: StageConfig | None = None):
        super().__init__(config)
        self.model: SDModel | None = None
        self._uncond = None  # the empty prompt's embedding, once the model is loaded

    @classmethod
    def problems(cls, config):
        out = missing_path(config, "model", "a diffusers SD-family folder (unet/, text_encoder/, tokenizer/, scheduler/[, vae/])",
                           "Fix generator.model, leave it null for the shipped tiny model, or train one with "
                           "'synfer train generator --data FETEXT --out FOLDER'.")
        if config.model and Path(config.model).is_dir():  # model_index.json read as JSON: validating loads no weights
            from synfer_plugins.sd.backbones import pipeline_problems

            out += pipeline_problems(config.model, cls.backbones)
        if config.eta > 0 and config.scheduler != "ddim":
            out.append(f"eta={config.eta} is DDIM's stochastic step; scheduler {config.scheduler!r} is deterministic. "
                       "Set generator.eta=0 or generator.scheduler=ddim.")
        model = Path(config.model) if config.model else TINY_MODEL_DIR
        approx = model / "approx_decoder" / "model.safetensors"  # approx_decoder.FOLDER (that module imports torch)
        if config.semantic_guidance.decoder == "approx" and model.exists() and not (model / "vae").is_dir():
            out.append(f"semantic_guidance.decoder: approx, but {model} is a pixel-space model (no vae/): there is no VAE decode to "
                       "approximate. Set semantic_guidance.decoder=vae.")
        elif config.semantic_guidance.decoder == "approx" and model.exists() and not approx.is_file():
            out.append(f"semantic_guidance.decoder: approx, but {approx} does not exist; distil it from the model's VAE with "
                       f"'synfer train approx-decoder --model {model} --data FETEXT_DIR', or set semantic_guidance.decoder=vae.")
        lay = config.layout
        if lay.enabled and lay.source and not Path(lay.source).exists():
            out.append(f"layout.source: {lay.source!r} does not exist; expected a FEText folder (images/ + metadata.jsonl) to invert "
                       "faces from. Build one with 'synfer fetext build' (make demo builds out/fetext-quick), or set layout.enabled=false.")
        return out

    # ------------------------------------------------------------ loading (lazy: validating never loads weights)
    @property
    def model_path(self) -> Path:
        return Path(self.config.model) if self.config.model else TINY_MODEL_DIR

    def target_device(self) -> str:
        """`device`, with "auto" resolved: cuda:LOCAL_RANK (each torchrun rank its own GPU) when CUDA is there, else cpu."""
        if self.config.device != "auto":
            return self.config.device
        import torch

        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"

    def load(self) -> SDModel:
        if self.model is None:
            import torch

            path = self.model_path
            if not path.exists():
                hint = (f"the tiny default model is not built yet: run 'synfer train generator --data FETEXT_DIR --out {TINY_MODEL_DIR}'"
                        if not self.config.model else
                        "check generator.model in the recipe, or train one with 'synfer train generator --data FETEXT_DIR --out DIR'")
                raise FileNotFoundError(f"no diffusion model at {path}; {hint}")
            from synfer_plugins.sd.backbones import backbone_for

            backbone = backbone_for(path, self.backbones)
            self.model = backbone.from_pretrained(path, device=self.target_device(), dtype=getattr(torch, self.config.dtype))
            for module in self.model.modules():  # sampling and guidance never train weights: no grads kept for them (~30% of
                module.requires_grad_(False)  # a guided backward's saved activations, docs/results.md)
                module.eval()
            self.model.set_au_scale(self.config.au_scale)
            self.model.forward_dtype = forward_dtype(self.config.forward_dtype, self.model)
            if self.config.channels_last:
                for module in (self.model.unet, self.model.vae):
                    if module is not None:
                        module.to(memory_format=torch.channels_last)
        return self.model

    # Attributes a calibrator or guidance needs (FERAnno runs the UNet; Eq. 4 needs the scheduler).
    unet = property(lambda self: self.load().unet)
    scheduler = property(lambda self: self.load().scheduler)
    text_encoder = property(lambda self: self.load().text_encoder)
    tokenizer = property(lambda self: self.load().tokenizer)
    vae = property(lambda self: self.load().vae)
    au_adapter = property(lambda self: self.load().au_adapter)
    # the rest of the DiffusionBackbone protocol (synfer.stages) a calibrator reads
    device = property(lambda self: self.load().device)
    dtype = property(lambda self: self.load().dtype)
    has_au_adapter = property(lambda self: self.load().au_adapter is not None)

    def encode_text(self, prompts: Sequence[str]):
        return self.load().encode_text(prompts)

    def encode_image(self, images):
        return self.load().encode_image(images)

    def decode(self, latents):
        return self.load().decode(latents)

    def predict_noise(self, latents, t, text_emb, aus=None, **unet_kwargs):
        return self.load().predict_noise(latents, t, text_emb, aus, **unet_kwargs)

    # ------------------------------------------------------------ sampling
    @property
    def size(self) -> int:
        m = self.load()
        size = self.config.size or m.native_size
        factor = m.vae_scale_factor * 2 ** (len(m.unet.config.block_out_channels) - 1)
        if size % factor:
            raise ValueError(f"generator.size={size} must be a multiple of {factor} for this model (native size {m.native_size})")
        return size

    def latent_shape(self) -> tuple[int, int, int]:
        m = self.load()
        side = self.size // m.vae_scale_factor
        return (m.unet.config.in_channels, side, side)

    def initial_latents(self, requests: Sequence[SampleRequest]):
        """x_T for each request from its own seed: independent of batch composition."""
        import torch

        m = self.load()
        shape = self.latent_shape()
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(r.seed))) for r in requests]
        return torch.stack(noise).to(device=m.device, dtype=m.dtype) * self.make_scheduler().init_noise_sigma

    def make_scheduler(self, steps: int | None = None):
        """A fresh `scheduler` (set to `steps`) from the model's scheduler config. Multistep solvers keep a
        history of model outputs, so every denoise gets its own: no state is shared between batches, nor
        with guidance or FERAnno, which read only the model's `scheduler` (its alphas_cumprod, add_noise)."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

        m = self.load()
        kind = self.config.scheduler
        if kind == "ddim":
            sched = DDIMScheduler.from_config(m.scheduler.config)
        elif kind == "dpm++":
            sched = DPMSolverMultistepScheduler.from_config(m.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
        else:
            sched = UniPCMultistepScheduler.from_config(m.scheduler.config)
        sched.set_timesteps(steps or self.config.steps, device=m.device)
        return sched

    def timesteps(self, steps: int | None = None):
        return self.make_scheduler(steps).timesteps

    def conditions(self, requests: Sequence[SampleRequest]):
        """(text embeddings, AU tensor) of a batch of requests."""
        import torch

        m = self.load()
        with torch.no_grad():
            text_emb = m.encode_text([r.prompt or r.expression for r in requests])
        return text_emb, m.au_tensor([r.aus for r in requests])

    def denoise(self, latents, text_emb, aus=None, start_step: int = 0, on_step: OnStep | None = None,
                guidance_scale: float | None = None, steps: int | None = None, seeds: Sequence[int] | None = None):
        """`scheduler` from `timesteps[start_step]` down to x_0 with classifier-free guidance.

        `on_step(i, t, latents, text_emb)` may return a new conditional text embedding (Eq. 6), or
        (that embedding, the conditional noise of this step) to skip this step's conditional forward;
        it runs with gradients enabled, the UNet passes here run without. `seeds` give the
        per-sample variance noise when eta > 0.
        """
        import torch

        m = self.load()
        cfg = self.config.guidance_scale if guidance_scale is None else guidance_scale
        sched = self.make_scheduler(steps)  # fresh: a multistep solver's history belongs to this batch only
        timesteps = sched.timesteps
        b = latents.shape[0]
        uncond_emb = uncond_aus = None
        if cfg != 1.0:
            uncond_emb = self._uncond_embedding().expand(b, -1, -1)
            uncond_aus = torch.zeros_like(aus) if aus is not None else None
        stochastic = self.config.eta > 0 and self.config.scheduler == "ddim"
        gens = [torch.Generator().manual_seed(int(s) + 1) for s in seeds] if (stochastic and seeds is not None) else None
        for i, t in enumerate(timesteps):
            if i < start_step:
                continue
            eps_c = None  # the conditional noise, when the guided step's own forward gives it (`reuse_forward`)
            if on_step is not None:
                new_emb = on_step(i, t, latents, text_emb)
                if isinstance(new_emb, tuple):
                    new_emb, eps_c = new_emb
                if new_emb is not None:
                    text_emb = new_emb.detach()
            with torch.no_grad() if on_step is not None else torch.inference_mode():  # guidance needs normal tensors
                x_in = sched.scale_model_input(latents, t)
                if eps_c is not None:
                    eps = eps_c if uncond_emb is None else (
                        (eps_u := m.predict_noise(x_in, t, uncond_emb, uncond_aus, no_grad_pass=True)) + cfg * (eps_c - eps_u))
                elif uncond_emb is None:
                    eps = m.predict_noise(x_in, t, text_emb, aus, no_grad_pass=True)
                else:
                    both_aus = torch.cat([uncond_aus, aus]) if aus is not None else None
                    eps_u, eps_c = m.predict_noise(torch.cat([x_in, x_in]), t, torch.cat([uncond_emb, text_emb.to(uncond_emb.dtype)]), both_aus,
                                                  no_grad_pass=True).chunk(2)
                    eps = eps_u + cfg * (eps_c - eps_u)
                extra = {}
                if gens is not None:
                    extra = {"eta": self.config.eta, "variance_noise": torch.stack(
                        [torch.randn(latents.shape[1:], generator=g) for g in gens]).to(latents.device, latents.dtype)}
                latents = sched.step(eps, t, latents, **extra).prev_sample
        return latents

    def _uncond_embedding(self):
        """The unconditional conditioning (SD: the empty prompt's embedding), once per loaded model (every batch's CFG
        branch uses it)."""
        if self._uncond is None:
            self._uncond = self.load().uncond_embedding()
        return self._uncond

    def sample(self, requests: Sequence[SampleRequest], x_T=None, start_step: int = 0, on_step: OnStep | None = None):
        """One batch: conditions -> denoise (from `x_T` if given) -> images in [-1, 1], (B, 3, H, W)."""
        import torch

        text_emb, aus = self.conditions(requests)
        latents = self.initial_latents(requests) if x_T is None else x_T
        latents = self.denoise(latents, text_emb, aus if self.load().au_adapter is not None else None, start_step=start_step,
                               on_step=on_step, seeds=[r.seed for r in requests])
        with torch.no_grad():
            return self.load().decode(latents)

    @staticmethod
    def to_pil(images) -> list:
        from PIL import Image

        arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu").permute(0, 2, 3, 1).numpy().astype("uint8")
        return [Image.fromarray(a) for a in arr]

    def step_callback(self, requests: Sequence[SampleRequest], guidance) -> OnStep | None:
        """Semantic guidance (Eq. 4-6) for this batch, or None when no classifier is given."""
        if guidance is None or not self.config.semantic_guidance.enabled:
            return None
        m = self.load()
        aus = m.au_tensor([r.aus for r in requests]) if m.au_adapter is not None else None
        return SemanticGuidance(self, guidance, requests, aus, self.config.semantic_guidance)

    def settings(self, guidance) -> dict:
        """What each record keeps of how it was sampled."""
        sg = self.config.semantic_guidance
        lay = self.config.layout
        if getattr(self, "_model_id", None) is None:  # once per generator: settings() runs for every generate() call
            self._model_id = model_id(self.model_path)
        gen = {"model": self._model_id, "scheduler": self.config.scheduler, "steps": self.config.steps,
               "guidance_scale": self.config.guidance_scale, "au_scale": self.config.au_scale if self.load().au_adapter is not None else None}
        if (fwd := self.load().forward_dtype) is not None:  # only when used: the records of runs without it keep their bytes
            gen["forward_dtype"] = str(fwd).removeprefix("torch.")
        return {"generator": gen,
                "semantic_guidance": ({"classifier": guidance.name, "start": sg.start, "stop": sg.stop, "every": sg.every,
                                       "lambda_g": sg.lambda_g, "updates": sg.updates} | ({"reuse_forward": True} if sg.reuse_forward else {})
                                      if guidance is not None and sg.enabled else None),
                "layout_init": ({"depth": lay.depth, "source": lay.source}
                                | ({"inversion_steps": lay.inversion_steps} if lay.inversion_steps else {})) if lay.enabled else None}

    @property
    def chunk(self) -> int:
        """C: the pipeline shards and resumes in whole chunks of this many sample indices."""
        return int(self.config.chunk)

    def generate(self, requests: list[SampleRequest], guidance=None) -> list[GeneratedSample]:
        """Each chunk k (indices [kC, (k+1)C)) among `requests` runs as one UNet batch of C slots, a
        request at slot index % C; the slots nobody asked for (a short last chunk, samples already on
        disk) hold throwaway copies of the chunk's first request. Output in the order of `requests`."""
        c = self.chunk
        extra = self.settings(guidance)
        chunks: dict[int, list[SampleRequest]] = {}
        for r in requests:
            chunks.setdefault(r.index // c, []).append(r)
        made: dict[int, GeneratedSample | None] = {}
        for members in chunks.values():
            slots = [replace(members[0]) for _ in range(c)]  # throwaway copies: layout init sets their layout_source
            for r in members:
                slots[r.index % c] = r
            images = self._sample_with_layout(slots, guidance)
            finite = images.flatten(1).isfinite().all(1).tolist()
            pils = self.to_pil(images.nan_to_num())
            for r in members:
                pos = r.index % c
                made[id(r)] = (GeneratedSample(request=r, image=pils[pos], extra=extra) if finite[pos]
                               else self._retry(r, guidance, extra))
        return [s for r in requests if (s := made[id(r)]) is not None]

    def _sample_with_layout(self, batch, guidance):
        layout = self._layout() if self.config.layout.enabled else None
        x_T, start_step = layout(batch) if layout is not None else (None, 0)
        return self.sample(batch, x_T=x_T, start_step=start_step, on_step=self.step_callback(batch, guidance))

    def _retry(self, request: SampleRequest, guidance, extra: dict) -> GeneratedSample | None:
        """A sample came out non-finite (NaN/inf, e.g. from a guidance gradient): sample it again from
        seeds derived from its own, `nan_retries` times; None (dropped, logged) if all fail. A retry
        runs alone (a batch of shape 1, whatever `chunk`): as deterministic as the chunk it replaces."""
        for attempt in range(1, self.config.nan_retries + 1):
            again = replace(request, seed=sample_seed(request.seed, attempt))
            images = self._sample_with_layout([again], guidance)
            if bool(images.isfinite().all()):
                log.warning("sample %d was non-finite; retry %d with derived seed %d succeeded", request.index, attempt, again.seed)
                return GeneratedSample(request=again, image=self.to_pil(images)[0], extra={**extra, "retry": attempt})
        log.warning("sample %d stays non-finite after %d retries: dropped (not written)", request.index, self.config.nan_retries)
        return None

    def _layout(self) -> LayoutInit:
        if getattr(self, "_layout_init", None) is None:
            self._layout_init = LayoutInit(self, self.config.layout)
        return self._layout_init

    # ------------------------------------------------------------ training (called by `synfer train`)
    @classmethod
    def train_generator(cls, opts, **kwargs):
        from synfer_plugins.sd.training import train_generator

        return train_generator(opts, backbones=cls.backbones, **kwargs)

    @classmethod
    def train_au_adapter(cls, opts, **kwargs):
        from synfer_plugins.sd.training import train_au_adapter

        return train_au_adapter(opts, backbones=cls.backbones, **kwargs)

    @classmethod
    def train_vae(cls, opts, **kwargs):
        from synfer_plugins.sd.training import train_vae

        return train_vae(opts, backbones=cls.backbones, **kwargs)
