"""Draw docs/mesh-pls.png: what `au_detector: mesh-pls` reports, on procedural faces and on one real photo.

    OMP_NUM_THREADS=1 python bench/mesh_pls_picture.py   # a few seconds on one CPU thread

Left: one procedural face per class (disgust, anger, happy, sad, neutral, surprise) from the
*test* identities (never seen by the read-out fit in bench/mesh_pls_fit.py), 192 x 192, AUs drawn
from the FAU-FE prior (seed 0, the first draw per class, not picked), with ground truth vs the
mesh-pls estimate for AU9, AU14 and AU17, the AUs the landmark geometry cannot see.
Right: scikit-image's astronaut photo (`skimage.data.astronaut()`, NASA, public domain) cropped to
the face, with every AU intensity mesh-pls reports on that crop. Prints the numbers it draws.
Needs `synfer models fetch face-mesh`, `retinaface` and `au-mesh-pls` (fetched on first use).
"""
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from skimage import data

from synfer.contract import labels as L
from synfer.contract.stages import FaceRecord
from synfer_plugins.mesh_pls_aus import BLIND_AUS, MeshPLSAUDetector
from synfer_plugins.procedural import render_faces, sample_expression_aus, split_identities

OUT = Path(__file__).resolve().parent.parent / "docs" / "mesh-pls.png"
CLASSES = ("disgust", "anger", "happy", "sad", "neutral", "surprise")
ASTRONAUT_BOX = (130, 0, 330, 220)  # left, top, right, bottom in the 512 x 512 photo: the face

det = MeshPLSAUDetector()

# Procedural faces of test identities, one per class, first draw of a seeded generator.
rng = np.random.default_rng(0)
aus = np.stack([sample_expression_aus(c, rng) for c in CLASSES])
faces = render_faces(aus, split_identities("test", len(CLASSES)), size=192, seeds=[10_000 + i for i in range(len(CLASSES))])
records = [FaceRecord(image=Image.fromarray(f), expression=c, source="procedural-test") for f, c in zip(faces, CLASSES)]
estimates = det.detect(records)
print("procedural test identities: ground truth -> mesh-pls")
for c, a, est in zip(CLASSES, aus, estimates):
    cells = [f"{au} {a[L.AU_KEYS.index(au)]:.2f} -> " + ("n/a" if est is None else f"{est[au]:.2f}") for au in BLIND_AUS]
    print(f"  {c:9s} " + "   ".join(cells))

# The astronaut, cropped to the face.
photo = Image.fromarray(data.astronaut()).crop(ASTRONAUT_BOX)
(astro,) = det.detect([FaceRecord(image=photo, expression=None, source="skimage.data.astronaut")])
print("astronaut (skimage.data.astronaut, NASA, public domain), mesh-pls AU intensities:")
print("  " + ("not measured (None)" if astro is None else "  ".join(f"{k} {v:.2f}" for k, v in astro.items())))

fig = plt.figure(figsize=(11, 5), dpi=100)
outer = fig.add_gridspec(1, 2, width_ratios=(3, 1.55), wspace=0.12, left=0.03, right=0.985, top=0.9, bottom=0.07)
left = outer[0].subgridspec(2, 3, wspace=0.25, hspace=0.25)
x = np.arange(len(BLIND_AUS))
for i, (c, a, est) in enumerate(zip(CLASSES, aus, estimates)):
    cell = left[i // 3, i % 3].subgridspec(1, 2, width_ratios=(1.5, 1), wspace=0.1)
    ax = fig.add_subplot(cell[0])
    ax.imshow(faces[i])
    ax.set_title(c, fontsize=10)
    ax.axis("off")
    ax = fig.add_subplot(cell[1])
    truth = [a[L.AU_KEYS.index(au)] for au in BLIND_AUS]
    guess = [0.0 if est is None else est[au] for au in BLIND_AUS]
    ax.bar(x - 0.2, truth, 0.4, color="0.6")
    ax.bar(x + 0.2, guess, 0.4, color="tab:orange")
    ax.set_xticks(x, [au[2:] for au in BLIND_AUS], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_yticks([0, 0.5, 1])
    ax.tick_params(axis="y", labelsize=7)
    ax.axhline(L.AU_ON_THRESHOLD, color="0.3", lw=0.6, ls=":")
    if est is None:
        ax.text(1, 0.5, "not measured", ha="center", fontsize=7)
fig.text(0.33, 0.955, "Procedural test identities: AU9 / AU14 / AU17, truth (grey) vs mesh-pls (orange); "
         "dotted: on at 0.25", ha="center", fontsize=10)

right = outer[1].subgridspec(1, 2, width_ratios=(1, 1.1), wspace=0.3)
ax = fig.add_subplot(right[0])
ax.imshow(photo)
ax.axis("off")
ax.set_title("skimage astronaut\n(NASA, public domain)", fontsize=9)
ax = fig.add_subplot(right[1])
keys = list(L.AU_KEYS)
vals = [0.0 if astro is None else astro[k] for k in keys]
colors = ["tab:orange" if k in BLIND_AUS else "tab:blue" for k in keys]
ax.barh(np.arange(len(keys)), vals, color=colors)
ax.set_yticks(np.arange(len(keys)), keys, fontsize=7.5)
ax.invert_yaxis()
ax.set_xlim(0, 1)
ax.tick_params(axis="x", labelsize=7)
for j, v in enumerate(vals):
    ax.text(min(v + 0.02, 0.8), j, f"{v:.2f}", va="center", fontsize=6.5, color="white" if v > 0.8 else "black")
ax.set_title("mesh-pls on the crop\n(orange: PLS read-out)", fontsize=9)

buf = io.BytesIO()
fig.savefig(buf, dpi=100)
Image.open(buf).convert("RGB").quantize(128, method=Image.Quantize.MEDIANCUT).save(OUT, optimize=True)  # small: docs/
print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")
