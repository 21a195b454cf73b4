"""One place that loads a state dict into a module and explains a mismatch in plain words.

torch's own error for a checkpoint of another architecture is a wall of key names; this says
how many keys are missing, unexpected or of the wrong shape, shows a few, and says what to do.
"""
from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path


class CheckpointMismatch(ValueError):
    pass


def load_state(module, state, source: str | Path, fix: str, strict: bool = True):
    """`module.load_state_dict(state)`, or CheckpointMismatch naming `source` and the `fix`.

    `state` is a state dict or a .safetensors path. Shape mismatches always fail; missing and
    unexpected keys fail when `strict`."""
    if isinstance(state, (str, Path)):
        from safetensors.torch import load_file  # heavy

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


# ---------------------------------------------------------------- the newest intact training checkpoint


def _readable_checkpoint(path: Path) -> bool:
    """Cheap integrity check of a torch checkpoint (a zip): a truncated file has no central directory."""
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _iter_of(path: Path) -> int:
    try:
        return int(path.stem.split("_")[1])
    except (IndexError, ValueError):
        return 1 << 62


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The newest intact checkpoint in `work_dir`: the one mmengine's CheckpointHook recorded last, or, when
    that one is truncated or gone, the newest earlier `iter_N.pth` that is intact (with a warning). None if none."""
    work_dir = Path(work_dir)
    marker = work_dir / "last_checkpoint"
    if not marker.exists():
        return None
    recorded = Path(marker.read_text().strip())
    if recorded.exists() and _readable_checkpoint(recorded):
        return recorded
    candidates = sorted((p for p in work_dir.glob("iter_*.pth") if re.fullmatch(r"iter_\d+\.pth", p.name)), key=_iter_of, reverse=True)
    older = [p for p in candidates if p != recorded and _iter_of(p) < _iter_of(recorded)]
    for p in older:
        if _readable_checkpoint(p):
            logging.getLogger(__name__).warning("checkpoint %s is truncated or unreadable; resuming from the previous one, %s",
                                                recorded, p)
            return p
    if recorded.exists() or older:
        raise RuntimeError(f"no intact checkpoint in {work_dir} ({recorded.name} and {len(older)} older one(s) are truncated "
                           "or unreadable); delete the work dir's iter_*.pth and last_checkpoint to start over, without --resume")
    return None
