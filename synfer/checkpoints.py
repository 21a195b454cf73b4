"""One place that loads a state dict into a module and explains a mismatch in plain words.

torch's own error for a checkpoint of another architecture is a wall of key names; this says
how many keys are missing, unexpected or of the wrong shape, shows a few, and says what to do.
"""
from __future__ import annotations

from pathlib import Path


class CheckpointMismatch(ValueError):
    pass


def load_state(module, state, source: str | Path, fix: str, strict: bool = True):
    """`module.load_state_dict(state)`, or CheckpointMismatch naming `source` and the `fix`.

    `state` is a state dict or a .safetensors path. Shape mismatches always fail; missing and
    unexpected keys fail when `strict`."""
    if isinstance(state, (str, Path)):
        from safetensors.torch import load_file

        state = load_file(str(state), device="cpu")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        for what, items in (("wrong shape", shapes), ("missing", missing if strict else []), ("unexpected", unexpected if strict else [])):
            if items:
                parts.append(f"{len(items)} {what} (e.g. {', '.join(items[:3])})")
        raise CheckpointMismatch(f"{source} does not fit this architecture: {'; '.join(parts)}. {fix}")
    module.load_state_dict(state, strict=strict)
    return module
