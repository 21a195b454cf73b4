"""Keys for on-disk caches: what a folder holds, by name, size and modification time.

A cache computed from model weights or a dataset is keyed by these stamps, so retraining a model
or rebuilding data in place never reuses results of the old files. Used by FERAnno's feature cache,
the VAE latent cache and the layout bank of the `sd` generator.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def folder_stamp(root: str | Path, suffixes: tuple[str, ...]) -> list[str]:
    """The folder's resolved path, then `relative/path:size:mtime_ns` of each file ending in one of
    `suffixes`, in a fixed order; a `work/` folder (where the caches themselves live) is skipped."""
    root = Path(root)
    out = [str(root.resolve())]
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "work")
        for name in sorted(n for n in names if n.endswith(suffixes)):
            st = os.stat(os.path.join(folder, name))
            out.append(f"{os.path.relpath(os.path.join(folder, name), root)}:{st.st_size}:{st.st_mtime_ns}")
    return out


def stamp_key(parts: list[str]) -> str:
    """12 hex digits of the stamps (and settings) in `parts`."""
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]
