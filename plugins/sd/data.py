"""FEText as the diffusion trainings read it: `FETextDataset` and the `expression_map` loss weight."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from synfer.engine.dataset import read_metadata
from synfer.labels import au_vector, canonical


class FETextDataset(torch.utils.data.Dataset):
    """FEText rows -> {"pixel_values": (3, S, S) in [-1, 1] | "latents": (C, s, s), "input_ids": (L,), "aus": (16,)}.

    Images are centre-cropped to a square and resized (bicubic) to `size`. Without a cache each item is
    decoded from its file; `use_cache(array)` (latent_cache.cached_latents: memory-mapped, on disk) serves
    uint8 images (pixel-space models) or the VAE latents (latent models: items then hold "latents", the
    VAE never runs). Nothing is cached in RAM. No flips: contempt is one-sided.
    """

    def __init__(self, root, size: int, tokenize=None, rows: list[dict] | None = None):
        self.root = Path(root)
        self.rows = rows if rows is not None else read_metadata(self.root)
        if not self.rows:
            raise ValueError(f"{root} holds no images")
        self.size = size
        self.captions = [r.get("caption") or r.get("prompt") or r.get("expression") or "" for r in self.rows]
        self.input_ids = tokenize(self.captions) if tokenize is not None else None
        self.aus = torch.from_numpy(np.stack([au_vector(r.get("aus")) for r in self.rows]))
        self.expressions = [canonical(r.get("expression") or "") for r in self.rows]
        self.pixels: np.ndarray | None = None  # (N, 3, S, S) uint8, memory-mapped
        self.latents: np.ndarray | None = None  # (N, C, s, s) float16, memory-mapped

    def __len__(self):
        return len(self.rows)

    def use_cache(self, array: np.ndarray) -> None:
        if array.dtype == np.uint8:
            self.pixels, self.latents = array, None
        else:
            self.pixels, self.latents = None, array

    def decode(self, i: int) -> torch.Tensor:
        """Row i's image, (3, S, S) uint8, from its file."""
        from PIL import Image

        with Image.open(self.root / self.rows[i]["file_name"]) as im:
            im = im.convert("RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((self.size, self.size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)

    def image(self, i: int) -> torch.Tensor:
        u8 = torch.from_numpy(np.array(self.pixels[i])) if self.pixels is not None else self.decode(i)
        return u8.float() / 127.5 - 1.0

    def __getitem__(self, i):
        item = {"aus": self.aus[i]}
        if self.latents is not None:
            item["latents"] = torch.from_numpy(np.array(self.latents[i], dtype=np.float32))
        else:
            item["pixel_values"] = self.image(i)
        if self.input_ids is not None:
            item["input_ids"] = self.input_ids[i]
        return item


def expression_map(dataset: FETextDataset, size: int, max_rows: int = 4000, seed: int = 0) -> torch.Tensor | None:
    """(size, size) map in [0, 1]: per pixel, the variance between expression-class means over the total
    variance (averaged over RGB), on up to `max_rows` rows, blurred 3x3. None with fewer than two classes."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=gen)[:max_rows].tolist()
    classes = sorted({dataset.expressions[i] for i in idx} - {""})
    if len(classes) < 2:
        return None
    x = torch.stack([dataset.image(i) for i in idx])
    if x.shape[-1] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="area")
    label = [dataset.expressions[i] for i in idx]
    means = torch.stack([x[[j for j, e in enumerate(label) if e == c]].mean(0) for c in classes])
    ratio = means.var(0).mean(0) / x.var(0).mean(0).clamp_min(1e-8)
    ratio = nn.functional.avg_pool2d(ratio[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
    return ratio / ratio.max().clamp_min(1e-12)
