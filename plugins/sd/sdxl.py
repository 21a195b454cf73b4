"""The SDXL backbone: two text encoders, a pooled text embedding and size time ids (`StableDiffusionXLPipeline`).

What differs from SD 1.x/2.x (model.SDModel), following `StableDiffusionXLPipeline.encode_prompt` and
`_get_add_time_ids`:
- the context is the penultimate hidden states of `text_encoder` (CLIPTextModel) and `text_encoder_2`
  (CLIPTextModelWithProjection) concatenated on the feature axis; the pooled embedding is
  `text_encoder_2`'s projected output;
- the UNet also takes `added_cond_kwargs={"text_embeds": pooled, "time_ids": (H, W, 0, 0, H, W)}`: original
  size = target size = the image's, no crop (the pipeline's defaults; training uses the same).
The pooled embedding rides along as trailing tokens of the conditioning tensor (`pack_extra`), so semantic
guidance moves it where the paper moves the text embedding (Eq. 6), and classifier-free guidance, micro-batching
and FERAnno handle it as they handle the context. Torch is imported inside functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from synfer_plugins.sd.model import SDModel, load_tokenizer


def pack_extra(context, vector):
    """(B, L, D) context + (B, P) vector -> (B, L + ceil(P / D), D): the vector zero-padded into trailing tokens."""
    import torch
    import torch.nn.functional as F

    d = context.shape[-1]
    n = -(-vector.shape[-1] // d)
    tokens = F.pad(vector.to(context.dtype), (0, n * d - vector.shape[-1])).view(vector.shape[0], n, d)
    return torch.cat([context, tokens], dim=1)


def unpack_extra(packed, tokens: int, size: int):
    """Inverse of `pack_extra`: -> (context (B, tokens, D), vector (B, size))."""
    return packed[:, :tokens], packed[:, tokens:].flatten(1)[:, :size]


class SDXLModel(SDModel):
    """SDXL components (`StableDiffusionXLPipeline` folders) with the SDModel hooks filled in."""

    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_parts = ("text_encoder", "text_encoder_2")

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, au_adapter=None, info=None, folder_scheduler=None,
                 text_encoder_2=None, tokenizer_2=None, force_zeros_for_empty_prompt: bool = True):
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt  # kept in model_index.json (diffusers' negative prompt)
        super().__init__(unet, text_encoder, tokenizer, scheduler, vae, au_adapter, info, folder_scheduler)

    @classmethod
    def load_components(cls, path: Path, dtype) -> dict:
        import json

        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from synfer_plugins.sd.backbones import load_schedulers

        cls.check_folder(path, ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
        index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
        return {"unet": UNet2DConditionModel.from_pretrained(str(path / "unet"), torch_dtype=dtype),
                "text_encoder": CLIPTextModel.from_pretrained(str(path / "text_encoder"), torch_dtype=dtype),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(str(path / "text_encoder_2"), torch_dtype=dtype),
                "tokenizer": load_tokenizer(path / "tokenizer"), "tokenizer_2": load_tokenizer(path / "tokenizer_2"),
                "vae": AutoencoderKL.from_pretrained(str(path / "vae"), torch_dtype=dtype) if (path / "vae").is_dir() else None,
                "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)), **load_schedulers(path)}

    def pipeline(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                                         tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
                                         scheduler=self.folder_scheduler or self.scheduler,
                                         force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False)

    @property
    def max_length(self) -> int:
        return min(int(t.model_max_length) for t in (self.tokenizer, self.tokenizer_2))

    @property
    def pooled_dim(self) -> int:
        return int(self.text_encoder_2.config.projection_dim)

    def tokenize(self, prompts: Sequence[str]):
        """(B, 2, L): the ids of both tokenizers."""
        import torch

        return torch.stack([tok(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").input_ids for tok in (self.tokenizer, self.tokenizer_2)], dim=1)

    def encode_tokens(self, input_ids, encoders: Sequence | None = None):
        """(B, L + pooled tokens, D1 + D2): both penultimate hidden states, then the pooled embedding packed."""
        import torch

        te1, te2 = encoders or self.text_encoders
        h1 = te1(input_ids[:, 0].to(te1.device), output_hidden_states=True).hidden_states[-2]
        out2 = te2(input_ids[:, 1].to(te2.device), output_hidden_states=True)
        return pack_extra(torch.cat([h1, out2.hidden_states[-2].to(h1.dtype)], dim=-1), out2.text_embeds)

    def uncond_embedding(self):
        """Zeros where the folder says `force_zeros_for_empty_prompt` (SDXL base), as the pipeline's negative prompt."""
        emb = super().uncond_embedding()
        return emb.zero_() if self.force_zeros_for_empty_prompt else emb

    def unet_kwargs(self, latents, text_emb) -> dict:
        import torch

        context, pooled = unpack_extra(text_emb, self.max_length, self.pooled_dim)
        h, w = (s * self.vae_scale_factor for s in latents.shape[-2:])
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=text_emb.device, dtype=text_emb.dtype).expand(text_emb.shape[0], 6)
        return {"encoder_hidden_states": context, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
