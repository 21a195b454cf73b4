"""Random-weight diffusers folders with Stable Diffusion 1.5's exact topology, for tests and bench/.

`build_sd15(folder, captions, width=...)` writes what `StableDiffusionPipeline.save_pretrained`
writes (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) for a model shaped
like SD 1.5 (facts in docs/results.md, SD 1.5 scale):
- UNet: 4 levels (3 CrossAttnDownBlock2D + DownBlock2D, mirrored up), 2 layers per block,
  16 cross-attention blocks (6 down, 1 mid, 9 up), cross-attention dim 768, 8 heads, 4 latent channels;
- VAE: AutoencoderKL, 4 levels, 4 latent channels, scaling factor 0.18215 (x8 downsampling);
- text: a 768-wide CLIP text encoder, 77 positions, with a CLIP byte-level BPE tokenizer whose
  merges are learnt here, offline, from the caption words (deterministically);
- scheduler: SD 1.5's DDIM settings (scaled-linear betas 0.00085-0.012, steps offset 1).
Only channel widths change with `width`: "narrow" (UNet 32/64/64/64, VAE 32/32/64/64, 1 text
layer) trains and samples in seconds on a CPU; "full" (320/640/1280/1280, VAE 128/256/512/512,
12 text layers) is SD 1.5's size: 859.5M UNet parameters.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # transformers' CLIPTokenizer
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77

WIDTHS = {  # name -> (UNet block_out_channels, VAE block_out_channels, text encoder layers, text MLP width)
    "narrow": ((32, 64, 64, 64), (32, 32, 64, 64), 1, 256),
    "full": ((320, 640, 1280, 1280), (128, 256, 512, 512), 12, 3072),
}


def _caption_words(captions: Sequence[str]) -> Counter:
    """Byte-level words of the captions, split and normalised exactly as CLIPTokenizer does."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    words: Counter = Counter()
    for c in captions:
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(c or "")))
    return words


def learn_bpe(captions: Sequence[str], max_merges: int = 4000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-format BPE (vocab, merges) learnt from the caption words (Sennrich et al. 2016): the most
    frequent adjacent pair merges first, ties broken by the pair itself, so the result is the same on
    every run. The vocabulary holds all 256 byte symbols with and without `</w>`: any text encodes."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in _caption_words(captions).items() if w}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + n
        words = new
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def clip_tokenizer(captions: Sequence[str]):
    """A transformers CLIPTokenizer (byte-level BPE, 77 tokens) over the captions' words."""
    from transformers import CLIPTokenizer

    vocab, merges = learn_bpe(captions)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def sd15_components(captions: Sequence[str], width: str | tuple = "narrow", sample_size: int = 512, seed: int = 0) -> dict:
    """The five components of an SD 1.5-topology pipeline with random weights (seeded)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_ch, vae_ch, text_layers, text_mlp = WIDTHS[width] if isinstance(width, str) else width
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(captions)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=tuple(unet_ch),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=tuple(vae_ch),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32, sample_size=sample_size, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=text_mlp, num_hidden_layers=text_layers, num_attention_heads=12,
        max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                              timestep_spacing="leading")
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def build_sd15(folder: str | Path, captions: Sequence[str], width: str | tuple = "narrow", sample_size: int = 512,
               seed: int = 0) -> Path:
    """Write an SD 1.5-topology diffusers folder with random weights; returns the folder."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    pipe = StableDiffusionPipeline(**sd15_components(captions, width, sample_size, seed), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    info = {"kind": "sd15-topology", "width": width if isinstance(width, str) else list(map(list, width[:2])), "random_weights": True}
    (folder / "synfer_model.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def count_cross_attention(unet) -> int:
    return sum(1 for name in unet.attn_processors if name.endswith("attn2.processor"))


# ---------------------------------------------------------------- the other SD families, narrow (tests)


def build_sd2(folder: str | Path, captions: Sequence[str], sample_size: int = 64, prediction_type: str = "v_prediction",
              seed: int = 0) -> Path:
    """A narrow SD 2.x-topology folder (`StableDiffusionPipeline`): 1024-wide text, linear projections in the
    transformer blocks, GELU text MLP, and SD 2.x 768-v's scheduler (v-prediction, scaled-linear betas)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = sd15_components(captions, "narrow", sample_size, seed)
    torch.manual_seed(seed)
    tok = parts["tokenizer"]
    parts["unet"] = UNet2DConditionModel(
        sample_size=sample_size // 8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, norm_num_groups=32)
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=1024, intermediate_size=256, num_hidden_layers=1, num_attention_heads=16,
        max_position_embeddings=MAX_LENGTH, hidden_act="gelu", projection_dim=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    parts["scheduler"] = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
                                       timestep_spacing="leading")
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(
        str(folder), safe_serialization=True)
    return Path(folder)


def build_sdxl(folder: str | Path, captions: Sequence[str], sample_size: int = 64, seed: int = 0) -> Path:
    """A narrow SDXL-topology folder (`StableDiffusionXLPipeline`), after diffusers' own SDXL test components: two CLIP
    text encoders (the second with projection: the pooled embedding), `addition_embed_type="text_time"` (pooled
    embedding + 6 time ids), linear projections, the first level without attention, VAE scaling 0.13025, and
    SDXL's Euler scheduler config (kept in the folder; synfer samples with DDIM, DPM++ or UniPC from it)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = sd15_components(captions, "narrow", sample_size, seed)
    torch.manual_seed(seed)
    tok = parts.pop("tokenizer")
    text, pooled, time_dim = 32, 32, 8
    parts["unet"] = UNet2DConditionModel(
        sample_size=sample_size // 8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=pooled + 6 * time_dim,
        cross_attention_dim=2 * text, norm_num_groups=32)
    parts["vae"].register_to_config(scaling_factor=0.13025)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=text, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=MAX_LENGTH, hidden_act="gelu", projection_dim=pooled,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    parts["text_encoder"], parts["text_encoder_2"] = CLIPTextModel(cfg), CLIPTextModelWithProjection(cfg)
    parts["scheduler"] = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(**parts, tokenizer=tok, tokenizer_2=tok, add_watermarker=False).save_pretrained(
        str(folder), safe_serialization=True)
    return Path(folder)
