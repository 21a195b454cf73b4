"""What the diffusion trainings read of FEText, computed once and kept on disk, memory-mapped.

- a latent model: the VAE latents (`SDModel.encode_image`: the latent distribution's mean, scaled), float16,
  so the VAE never runs during training (nor sits on the training device);
- a pixel-space model: the centre-cropped, resized images, uint8 (exactly what was decoded before: the
  training bytes of the tiny model do not change).

Nothing is kept in RAM beyond what the OS page cache holds. The cache lives in the run's work folder as
`latents-<key>/` (`latents.npy` + `done.json`), keyed like the FERAnno feature cache (feranno/train.py
`model_key`): the folders' paths and the size and modification time of the VAE weights and of the data's
metadata, plus the image size; retraining the VAE or rebuilding the data never reuses old latents, and
retraining the UNet (which does not change them) keeps them. Written under a temporary name and renamed
when complete, so a killed run never leaves a half cache behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from synfer.engine.stamps import folder_stamp, stamp_key

ARRAY, DONE = "latents.npy", "done.json"


def cache_key(vae_folder: str | Path | None, data: str | Path, size: int) -> str:
    """(VAE weights or none, data, size) -> 12 hex digits."""
    stamp = [f"size={size}"] + folder_stamp(data, (".jsonl",))
    stamp += folder_stamp(vae_folder, (".safetensors", ".bin", ".json")) if vae_folder is not None else ["pixels"]
    return stamp_key(stamp)


def encode_all(sd, dataset, folder: Path, batch_size: int = 32, device=None) -> None:
    """Fill folder/latents.npy with every row of `dataset` (FETextDataset) as the trainings read it:
    `sd`'s VAE latents, or the uint8 images when `sd` is None or a pixel-space model."""
    import torch
    from tqdm.auto import tqdm

    n = len(dataset)
    vae = None if sd is None else sd.vae
    if vae is None:
        shape, dtype = (3, dataset.size, dataset.size), np.uint8
    else:
        f = sd.vae_scale_factor
        shape, dtype = (sd.vae.config.latent_channels, dataset.size // f, dataset.size // f), np.float16
    arr = np.lib.format.open_memmap(str(folder / ARRAY), mode="w+", dtype=dtype, shape=(n, *shape))
    if vae is not None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        vae_device = vae.device
        vae.to(device)
    try:
        for start in tqdm(range(0, n, batch_size), desc="VAE latents" if vae is not None else "images", disable=n <= batch_size):
            idx = range(start, min(n, start + batch_size))
            imgs = torch.stack([dataset.decode(i) for i in idx])  # uint8
            if vae is None:
                arr[start:start + len(idx)] = imgs.numpy()
                continue
            with torch.no_grad():
                px = (imgs.float() / 127.5 - 1.0).to(device=device, dtype=vae.dtype)
                arr[start:start + len(idx)] = sd.encode_image(px).float().cpu().numpy().astype(np.float16)
    finally:
        if vae is not None:
            vae.to(vae_device)
    arr.flush()
    del arr


def cached_latents(sd, dataset, work_dir: str | Path, vae_folder: str | Path | None, data: str | Path) -> tuple[np.ndarray, Path]:
    """The dataset's latents (or images: `sd` None or pixel space), computed on first use into
    work_dir/latents-<key>/, opened memory-mapped."""
    latent = sd is not None and sd.vae is not None
    key = cache_key(vae_folder if latent else None, data, dataset.size)
    folder = Path(work_dir) / f"latents-{key}"
    if not (folder / DONE).exists():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")  # one per process: torchrun ranks never share one
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        encode_all(sd, dataset, tmp)
        (tmp / DONE).write_text(json.dumps({"rows": len(dataset), "size": dataset.size, "vae": str(vae_folder) if latent else None,
                                            "data": str(data)}, indent=2) + "\n")
        try:
            tmp.rename(folder)
        except OSError:  # another rank finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    arr = np.load(str(folder / ARRAY), mmap_mode="r")
    if len(arr) != len(dataset):
        raise RuntimeError(f"{folder} holds {len(arr)} rows, the data {data} has {len(dataset)}: delete {folder} and train again")
    return arr, folder
