"""The diffusion model the "sd" generator samples from: one diffusers folder of the SD family (paper 4.2).

`SDModel` holds the components of any SD 1.x/2.x-format folder (SDXL: sdxl.py) (`unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`), loaded with diffusers/transformers
`from_pretrained` from local disk, plus an optional AU adapter (`au_adapter.safetensors` +
`au_adapter.json`, see au_adapter.py). A folder without `vae/` is a pixel-space model:
the "latents" are the image in [-1, 1].

The shipped default is a tiny pixel-space model (`create_tiny_model`), trained by
`synfer train generator` on the procedural FEText. Its config comes from measurements on
a 2-core CPU (docs/results.md, early design measurements): 32x32 pixels, channels (32, 64, 64), one layer per
block, attention only at 16x16 and 8x8 (attention at full resolution is ruinous on a
CPU), 1.7M parameters, 0.64 s per training step of 32; ten minutes of training gave
recognisable faces with 75.5% oracle expression accuracy, better than the 64x64
pixel-unshuffle variant (69%, noisier) and cheaper than a latent model that would
need a VAE trained first. Its text encoder is a 2-layer CLIP text model over a
WordLevel vocabulary of the FEText captions (a CLIPTokenizer without merges would
split words into characters).

Torch, diffusers and transformers are imported inside functions: registering the
generator (which imports this module) must not import them.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from synfer.labels import AU_KEYS, au_vector

TINY_MODEL_DIR = Path(__file__).parent.parent / "models" / "tiny-sd"
MODEL_INFO = "synfer_model.json"  # marks folders made by synfer (kind, pixel space, training notes)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "<|startoftext|>", "<|endoftext|>")

# ---------------------------------------------------------------- tokenizer


def build_word_tokenizer(captions: Sequence[str], max_length: int = 64, max_vocab: int = 4096):
    """A WordLevel tokenizer over the caption vocabulary, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for c in captions:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(c or "")))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][: max_vocab - len(SPECIAL_TOKENS)]
    vocab = {w: i for i, w in enumerate(list(SPECIAL_TOKENS) + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    bos, eos = SPECIAL_TOKENS[2], SPECIAL_TOKENS[3]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="[UNK]", pad_token="[PAD]",
                                   model_max_length=max_length)


def load_tokenizer(folder: Path):
    """The folder's tokenizer: CLIP BPE for real SD folders, else the saved fast tokenizer."""
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

    cfg_path = folder / "tokenizer_config.json"
    cls_name = json.loads(cfg_path.read_text()).get("tokenizer_class", "") if cfg_path.exists() else ""
    if cls_name.startswith("CLIPTokenizer") or ((folder / "merges.txt").exists() and not (folder / "tokenizer.json").exists()):
        return CLIPTokenizer.from_pretrained(str(folder))
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


# ---------------------------------------------------------------- the model


class SDModel:
    """The components of one diffusion model folder, with the few operations every stage needs.

    This class is the SD 1.x / SD 2.x backbone (diffusers' `StableDiffusionPipeline` folders: epsilon or
    v-prediction) and the base of every other one (sdxl.py). A backbone differs from it by a few hooks:
    - `pipeline_classes`: the diffusers pipelines whose folders it reads (model_index.json `_class_name`);
      `pipeline()` builds the first of them from the components, to write model_index.json;
    - `load_components(path, dtype)`: the folder's components, as keyword arguments of the constructor;
    - `tokenize(prompts)` and `encode_tokens(input_ids)`: text -> the conditioning the core moves as one
      (B, tokens, D) tensor (guidance's Eq. 6 moves all of it); extra conditioning such as SDXL's pooled
      embedding rides along as trailing tokens (`pack_extra`);
    - `unet_kwargs(latents, text_emb)`: that tensor -> the UNet's arguments (context, added_cond_kwargs);
    - `uncond_embedding()`: classifier-free guidance's unconditional conditioning (SD: the empty prompt's);
    - `to_x0_eps(output, x_t, t)`: the UNet's output -> (x0, noise), honouring `prediction_type` (prediction.py).
    """

    pipeline_classes: tuple[str, ...] = ("StableDiffusionPipeline",)
    text_parts: tuple[str, ...] = ("text_encoder",)  # text encoder attributes, in tokenize()'s order

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, au_adapter=None, info: dict | None = None,
                 folder_scheduler=None):
        self.unet, self.text_encoder, self.tokenizer, self.scheduler, self.vae = unet, text_encoder, tokenizer, scheduler, vae
        self.folder_scheduler = folder_scheduler  # the folder's own sampler (e.g. SDXL's Euler), written back by save_pretrained
        self.au_adapter = None
        self.forward_dtype = None  # a torch dtype: the gradient-free passes (predict_noise(..., no_grad_pass=True)) autocast to it
        self.info = dict(info or {})
        if au_adapter is not None:
            self.set_au_adapter(au_adapter)

    # ------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=None, load_au_adapter: bool = True) -> "SDModel":
        """The backbone the folder's model_index.json names (`backbone_for`), loaded. On a subclass: that backbone."""
        import torch

        from synfer_plugins.sd.au_adapter import AUAdapter

        path = Path(path)
        if cls is SDModel:
            from synfer_plugins.sd.backbones import backbone_for

            cls = backbone_for(path)
        dtype = dtype or torch.float32
        parts = cls.load_components(path, dtype)
        info = json.loads((path / MODEL_INFO).read_text()) if (path / MODEL_INFO).exists() else {}
        adapter = AUAdapter.load(path, dtype=dtype) if load_au_adapter and AUAdapter.exists(path) else None
        return cls(**parts, au_adapter=adapter, info=info).to(device)

    @classmethod
    def load_components(cls, path: Path, dtype) -> dict:
        """Hook: the folder's components as constructor arguments (SD 1.x/2.x: unet, text_encoder, tokenizer, scheduler, vae)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        from synfer_plugins.sd.backbones import load_schedulers

        cls.check_folder(path, ("unet", "text_encoder", "tokenizer"))
        return {"unet": UNet2DConditionModel.from_pretrained(str(path / "unet"), torch_dtype=dtype),
                "text_encoder": CLIPTextModel.from_pretrained(str(path / "text_encoder"), torch_dtype=dtype),
                "tokenizer": load_tokenizer(path / "tokenizer"),
                "vae": AutoencoderKL.from_pretrained(str(path / "vae"), torch_dtype=dtype) if (path / "vae").is_dir() else None,
                **load_schedulers(path)}

    @classmethod
    def check_folder(cls, path: Path, parts: Sequence[str]) -> None:
        missing = [d for d in parts if not (path / d).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a {cls.pipeline_classes[0]} folder: missing {', '.join(d + '/' for d in missing)} (expected "
                f"{', '.join(d + '/' for d in parts)}, scheduler/, optional vae/). Train one with "
                "'synfer train generator --data FETEXT --out DIR'.")

    def save_pretrained(self, path: str | Path) -> None:
        """Write the diffusers layout (+ au_adapter files); the UNet is saved without the adapter in it."""
        from synfer_plugins.sd.au_adapter import AUAdapter

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.au_adapter is not None:
            AUAdapter.detach(self.unet)
        try:
            self.unet.save_pretrained(str(path / "unet"))
        finally:
            if self.au_adapter is not None:
                self.au_adapter.attach(self.unet)
        for name in self.text_parts:
            getattr(self, name).save_pretrained(str(path / name))
            getattr(self, name.replace("text_encoder", "tokenizer")).save_pretrained(str(path / name.replace("text_encoder", "tokenizer")))
        (self.folder_scheduler or self.scheduler).save_pretrained(str(path / "scheduler"))
        if self.vae is not None:
            self.vae.save_pretrained(str(path / "vae"))
        if self.au_adapter is not None:
            self.au_adapter.save(path)
        else:  # an adapter left from earlier UNet weights no longer fits them: 'synfer train au-adapter' again
            from synfer_plugins.sd.au_adapter import CONFIG_NAME, IP_ADAPTER_DIR, IP_ADAPTER_WEIGHTS, WEIGHTS_NAME

            for name in (WEIGHTS_NAME, CONFIG_NAME, f"{IP_ADAPTER_DIR}/{IP_ADAPTER_WEIGHTS}"):
                (path / name).unlink(missing_ok=True)
        if self.vae is not None:
            self.write_model_index(path)
        if self.info:
            (path / MODEL_INFO).write_text(json.dumps(self.info, indent=2) + "\n")

    def pipeline(self):
        """Hook: the diffusers pipeline of these components (`pipeline_classes[0]`)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                                       scheduler=self.folder_scheduler or self.scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    def write_model_index(self, path: str | Path) -> None:
        """diffusers' model_index.json, so `<pipeline_classes[0]>.from_pretrained(path)` (and every tool that reads
        diffusers folders) loads what synfer wrote. Latent models only: a pixel-space model has no VAE to decode."""
        self.pipeline().save_config(str(path))

    def modules(self) -> list:
        """The torch modules (UNet, text encoders, VAE, AU adapter) that are present."""
        return [m for m in (self.unet, *self.text_encoders, self.vae, self.au_adapter) if m is not None]

    def to(self, device=None, dtype=None) -> "SDModel":
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for m in self.modules():
            if kw:
                m.to(**kw)
        return self

    # ------------------------------------------------------------ properties
    @property
    def text_encoders(self) -> list:
        return [getattr(self, name) for name in self.text_parts]

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def has_au_adapter(self) -> bool:
        return self.au_adapter is not None

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        s = self.unet.config.sample_size
        return (s if isinstance(s, int) else s[0]) * self.vae_scale_factor

    @property
    def max_length(self) -> int:
        return min(int(self.tokenizer.model_max_length), int(self.text_encoder.config.max_position_embeddings))

    def set_au_adapter(self, adapter) -> None:
        from synfer_plugins.sd.au_adapter import AUAdapter

        if self.au_adapter is not None:
            AUAdapter.detach(self.unet)
        self.au_adapter = adapter
        if adapter is not None:
            adapter.to(device=self.unet.device, dtype=self.unet.dtype)
            adapter.attach(self.unet)

    def set_au_scale(self, scale: float) -> None:
        if self.au_adapter is not None:
            self.au_adapter.set_scale(scale)

    # ------------------------------------------------------------ operations
    def tokenize(self, prompts: Sequence[str]):
        """Hook: prompts -> token ids, (B, L) here ((B, 2, L) for SDXL's two tokenizers)."""
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt").input_ids

    def encode_tokens(self, input_ids, encoders: Sequence | None = None):
        """Hook: token ids -> the conditioning (B, tokens, D). SD: the CLIP hidden states, the UNet's cross-attention
        context (no attention mask). `encoders` replaces `text_encoders` (training's frozen bf16 copies)."""
        (encoder,) = encoders or self.text_encoders
        return encoder(input_ids.to(encoder.device))[0]

    def encode_text(self, prompts: Sequence[str] | None = None, input_ids=None):
        """(B, tokens, D): the conditioning every stage passes to `predict_noise` (and guidance moves)."""
        if input_ids is None:
            input_ids = self.tokenize(prompts)
        return self.encode_tokens(input_ids)

    def uncond_embedding(self):
        """Hook: (1, tokens, D), the unconditional branch of classifier-free guidance. SD: the empty prompt's."""
        import torch

        with torch.no_grad():
            return self.encode_text([""])

    def unet_kwargs(self, latents, text_emb) -> dict:
        """Hook: the conditioning -> the UNet's keyword arguments. SD: the context only."""
        return {"encoder_hidden_states": text_emb}

    def to_x0_eps(self, output, x_t, t):
        """Hook: the UNet's output at x_t and (scalar) timestep t -> (x0, noise) (Eq. 4 for an epsilon model)."""
        from synfer_plugins.sd.prediction import prediction_type, split_prediction

        a_t = self.scheduler.alphas_cumprod[int(t)].to(x_t.device, x_t.dtype)
        return split_prediction(output, x_t, a_t, prediction_type(self.scheduler))

    def encode_image(self, images, sample_generator=None):
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents; identity in pixel space. Differentiable."""
        if self.vae is None:
            return images
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample(sample_generator) if sample_generator is not None else dist.mean
        return z * self.vae.config.scaling_factor

    def decode(self, latents):
        """Scaled latents -> images in [-1, 1] (not clamped); identity in pixel space. Differentiable."""
        if self.vae is None:
            return latents
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def au_tensor(self, aus: Sequence[dict[str, float] | None]):
        import numpy as np
        import torch

        return torch.from_numpy(np.stack([au_vector(a) for a in aus])).to(device=self.device, dtype=self.dtype)

    def predict_noise(self, latents, t, text_emb, aus=None, *, no_grad_pass: bool = False, **unet_kwargs):
        """One conditional UNet pass; its output is of the scheduler's `prediction_type` (eps, v or x0: `to_x0_eps`).
        With an AU adapter, `aus` (B, 16) in [0, 1] (None: all zero).
        `no_grad_pass`: a pass nobody differentiates (denoising, layout inversion); with `forward_dtype` set
        it runs under autocast to that dtype and returns `latents`' dtype (generator.forward_dtype)."""
        import torch

        kwargs = self.unet_kwargs(latents, text_emb)
        added = kwargs.pop("added_cond_kwargs", None)
        if self.au_adapter is not None:
            if aus is None:
                aus = torch.zeros(latents.shape[0], len(AU_KEYS), device=latents.device, dtype=text_emb.dtype)
            added = {**(added or {}), **self.au_adapter.added_cond_kwargs(aus.to(text_emb.dtype))}
        kwargs.update(unet_kwargs)
        if not (no_grad_pass and self.forward_dtype is not None and self.forward_dtype != latents.dtype):
            # no autocast context of our own here: autocast(enabled=False) would switch off a caller's (bf16 training)
            return self.unet(latents, t, added_cond_kwargs=added, **kwargs).sample
        with torch.autocast(latents.device.type, dtype=self.forward_dtype):
            return self.unet(latents, t, added_cond_kwargs=added, **kwargs).sample.to(latents.dtype)


# ---------------------------------------------------------------- the tiny default


def create_tiny_model(captions: Sequence[str], *, size: int = 32, max_length: int = 64, seed: int = 0,
                      block_out_channels: tuple[int, ...] = (32, 64, 64), text_dim: int = 64) -> SDModel:
    """A fresh pixel-space model (random weights) with a vocabulary built from `captions`.

    Defaults as measured (docs/results.md, early design measurements): 32x32, (32, 64, 64), attention at 16x16 and 8x8 only,
    1.7M UNet parameters; cosine noise schedule (better than SD's scaled-linear at low resolution).
    """
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(captions, max_length=max_length)
    n = len(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=text_dim, attention_head_dim=4, norm_num_groups=8)  # attention_head_dim = number of heads
    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=max_length, projection_dim=text_dim, pad_token_id=vocab["[PAD]"],
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")
    info = {"kind": "synfer-tiny-sd", "pixel_space": True, "size": size, "train_text_encoder": True}
    return SDModel(unet, text_encoder, tokenizer, scheduler, vae=None, info=info)
