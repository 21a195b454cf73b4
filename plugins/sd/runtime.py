"""What the sd generator decides about the machine and the model before it samples: the dtype of its gradient-free
passes (`generator.forward_dtype: auto` asks whether the CPU computes bfloat16 natively), and the portable name
rows give the model (its folder and the sha256 of its weights, never a machine path). No torch at import time."""
from __future__ import annotations

from pathlib import Path


def model_id(path: Path) -> str:
    """How rows name the model: its folder's name and the sha256 of its weights ('tiny-sd@sha256:1f2e...'), never a
    machine path; hashed once per process and reused by the dataset card (synfer.engine.card.weights_sha256)."""
    from synfer.engine.card import weights_sha256

    return f"{Path(path).name}@sha256:{weights_sha256(Path(path))[0][:16]}"


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX). SYNFER_NATIVE_BF16=1 (or 0) says so instead of
    asking the CPU: CI forces 1 on an AVX2 machine so that it sees what `forward_dtype: auto` does on a BF16 host."""
    import os

    import torch

    forced = os.environ.get("SYNFER_NATIVE_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def forward_dtype(setting: str | None, model) -> "object | None":
    """generator.forward_dtype -> the torch dtype the gradient-free passes of `model` (an SDModel) autocast to, or None."""
    import torch

    if setting != "auto":
        return getattr(torch, setting) if setting else None
    native = native_bf16_cpu()
    return torch.bfloat16 if model.device.type == "cpu" and model.dtype == torch.float32 and native else None
