"""Issue 18 lever: a copy of a synthetic set whose mean radial power spectrum matches real faces'.

The synthetic 32 px faces carry less high-frequency power than real FEText faces brought to 32 px
(eyes, brows and mouth lines are softer). This writes OUT with every image filtered by one radial
gain, sqrt(P_real / P_synthetic) per frequency band, estimated from the first N real training faces
and 2,000 synthetic ones (reflect-padded FFT at 32 px, 16 bands). The metadata is copied
unchanged, so `synfer benchmark downstream ... synthetic=OUT` trains on the same samples and labels.

    OMP_NUM_THREADS=1 python bench/spectrum_align.py out/synth-s12-l6k-cfg1-big out/synth-cfg1-big-spec --real out/fetext-procedural --n-real 400
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from synfer.engine.arrays import load_arrays

SIZE, PAD, BANDS = 32, 16, 16


def band_index() -> np.ndarray:
    n = SIZE + 2 * PAD
    radius = np.sqrt(np.fft.fftfreq(n)[:, None] ** 2 + np.fft.fftfreq(n)[None, :] ** 2)
    return np.digitize(radius, np.linspace(0, radius.max() + 1e-6, BANDS + 1)) - 1


def pad(x: np.ndarray) -> np.ndarray:
    return np.pad(x.astype(np.float32), ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)), mode="reflect")


def band_power(x: np.ndarray, bands: np.ndarray) -> np.ndarray:
    """Mean power per radial band of uint8 images (N, H, W, 3), over images and channels, each one's mean removed."""
    g = pad(x) / 255.0
    g -= g.mean((1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(g, axes=(1, 2))) ** 2).mean((0, 3))
    return np.array([power[bands == k].mean() for k in range(BANDS)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("synthetic")
    ap.add_argument("out")
    ap.add_argument("--real", default="out/fetext-procedural")
    ap.add_argument("--n-real", type=int, default=400)
    a = ap.parse_args()
    src, dst, bands = Path(a.synthetic), Path(a.out), band_index()
    real = load_arrays(a.real, size=SIZE, label_key="expression", limit=a.n_real)[0]
    syn = load_arrays(src, size=SIZE, kept_only=False, limit=2000)[0]
    gain = np.sqrt(band_power(real, bands) / band_power(syn, bands))
    gain[0] = 1.0  # the mean is removed above: leave brightness alone
    print("gain per band (low -> high frequency):", np.round(gain, 3).tolist())
    rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines() if line.strip()]
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for start in range(0, len(rows), 512):
        chunk = rows[start:start + 512]
        x = np.stack([np.asarray(Image.open(src / r["file_name"]).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)) for r in chunk])
        y = np.real(np.fft.ifft2(np.fft.fft2(pad(x), axes=(1, 2)) * gain[bands][None, :, :, None], axes=(1, 2)))
        for r, image in zip(chunk, np.clip(np.round(y[:, PAD:PAD + SIZE, PAD:PAD + SIZE]), 0, 255).astype(np.uint8)):
            Image.fromarray(image).save(dst / r["file_name"])
    shutil.copy(src / "metadata.jsonl", dst / "metadata.jsonl")
    after = load_arrays(dst, size=SIZE, kept_only=False, limit=2000)[0]
    print("synthetic / real power per band, after:", np.round(band_power(after, bands) / band_power(real, bands), 3).tolist())


if __name__ == "__main__":
    main()
