"""LoRA on the UNet for `synfer train generator --lora-rank R`, with peft, as diffusers' own
train_text_to_image_lora.py does it:

- `add_lora(unet, rank)`: `unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian",
  target_modules=to_q/to_k/to_v/to_out.0))`; the base weights are frozen, only the adapter's A/B train;
- `save_lora(folder, unet)`: `get_peft_model_state_dict` -> `convert_state_dict_to_diffusers` ->
  `StableDiffusionPipeline.save_lora_weights`, i.e. `folder/pytorch_lora_weights.safetensors`, the file
  `pipe.load_lora_weights(folder)` reads;
- `fuse_lora_file(unet, folder)`: what synfer itself samples from: a fresh float32 UNet of the base model
  with that same file loaded by diffusers (`load_lora_adapter`) and fused into its weights.

The trained model folder therefore holds the fused UNet (synfer and diffusers load it as any SD folder) plus
`lora/pytorch_lora_weights.safetensors`, which applies to the *base* model recorded in synfer_model.json
(`lora.base`), not to the fused UNet beside it.
"""
from __future__ import annotations

from pathlib import Path

LORA_DIR = "lora"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # attention projections, as diffusers' LoRA example


def add_lora(unet, rank: int, alpha: float | None = None) -> int:
    """Freeze the UNet and add a rank-`rank` LoRA to its attention projections; returns the trainable parameter count."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"--lora-rank {rank}: expected a positive rank (4 to 128 are usual; 0 or absent trains the full UNet)")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=float(alpha or rank), init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    return sum(p.numel() for p in trainable)


def lora_state_dict(unet) -> dict:
    """The adapter's weights in diffusers' naming (float32, on the CPU)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_lora(folder: str | Path, unet, pipeline: str = "StableDiffusionPipeline") -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` as diffusers' LoRA scripts do (through `pipeline`'s
    save_lora_weights, the class whose load_lora_weights reads it); returns the file."""
    import diffusers

    folder = Path(folder)
    getattr(diffusers, pipeline).save_lora_weights(save_directory=str(folder), unet_lora_layers=lora_state_dict(unet), safe_serialization=True)
    return folder / LORA_WEIGHTS


def fuse_lora_file(unet, folder: str | Path):
    """Load `folder`'s LoRA file into `unet` (the base weights, no adapter yet) with diffusers and fuse it in place."""
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / LORA_WEIGHTS))
    unet.load_lora_adapter(state, prefix="unet", adapter_name="synfer")
    unet.fuse_lora()
    unet.unload_lora()
    return unet
