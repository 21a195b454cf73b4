"""The optimizers `synfer train` offers (`--optimizer`): torch's AdamW, or bitsandbytes' 8-bit AdamW on CUDA."""
from __future__ import annotations

import importlib.util

OPTIMIZERS = ("adamw", "adamw8bit")


def check_optimizer(name: str) -> None:
    """Raise a ValueError that says what to do when optimizer `name` cannot run here (before any model loads)."""
    import torch  # heavy

    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if name == "adamw8bit":
        missing = [what for what, ok in (("the bitsandbytes package", importlib.util.find_spec("bitsandbytes") is not None),
                                         ("a CUDA GPU", torch.cuda.is_available())) if not ok]
        if missing:
            raise ValueError(f"--optimizer adamw8bit (bitsandbytes' 8-bit AdamW) needs bitsandbytes and a CUDA GPU; this machine lacks "
                             f"{' and '.join(missing)}. Install it on a CUDA machine (pip install bitsandbytes), or use --optimizer adamw.")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    """AdamW (torch) or bitsandbytes' AdamW8bit (optimizer states in 8 bits: ~75% less optimizer memory), as diffusers' scripts."""
    import torch  # heavy

    check_optimizer(name)
    if name == "adamw8bit":
        import bitsandbytes as bnb  # optional

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
