"""Fit and measure `mesh-pls`'s AU9/AU14/AU17 read-out on the procedural world (docs/assets.md).

    OMP_NUM_THREADS=1 python bench/mesh_pls_fit.py [--n 400]   # ~2 min on one CPU thread

Renders --n faces from train identities and --n from test identities (192 x 192, AUs drawn from
the FAU-FE prior per class, seed 0), runs the face mesh and the PLS inverse on each, fits the
ridge read-out on train, and prints READOUT (for plugins/mesh_pls_aus.py) and the test F1
(AU on at intensity >= 0.25, synfer.engine.scoring.au_f1_scores). Needs `synfer models fetch face-mesh`,
`retinaface` and `au-mesh-pls` (fetched on first use).
"""
import argparse

import numpy as np
from PIL import Image

from synfer import labels as L
from synfer.engine.scoring import au_f1_scores
from synfer_plugins.mesh_pls_aus import BLIND_AUS, MeshPLSAUDetector
from synfer_plugins.procedural import render_faces, sample_expression_aus, split_identities

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=400)
args = ap.parse_args()
det = MeshPLSAUDetector()
classes = L.LABEL_SPACES["affectnet8"]


def world(split: str, offset: int):
    rng = np.random.default_rng(offset)
    aus = np.stack([sample_expression_aus(classes[i % len(classes)], rng) for i in range(args.n)])
    faces = render_faces(aus, split_identities(split, args.n), size=192, seeds=[offset + i for i in range(args.n)])
    pts, presence = det._mesh.landmarks([Image.fromarray(f) for f in faces])
    scores, residual = zip(*(det.pls.scores(p) for p in pts))
    return aus, pts, presence, np.array(scores), np.array(residual)


train, test = world("train", 0), world("test", 10_000)
x_train = np.c_[train[3], np.ones(args.n)]
print("READOUT: dict[str, tuple[float, ...]] = {")
weights = {}
for au in BLIND_AUS:
    y = train[0][:, L.AU_KEYS.index(au)]
    w = np.linalg.solve(x_train.T @ x_train + np.eye(x_train.shape[1]), x_train.T @ y)  # ridge, lambda 1
    weights[au] = w
    print(f'    "{au}": ({", ".join(f"{v:.4g}" for v in w)}),')
print("}")
aus, pts, presence, scores, residual = test
print(f"test: presence >= 0.5 on {(presence >= 0.5).sum()}/{args.n}; residual RMS median {np.median(residual):.2f}, "
      f"max {residual.max():.2f}")
pred = np.zeros_like(aus)
for au, w in weights.items():
    pred[:, L.AU_KEYS.index(au)] = np.clip(np.c_[scores, np.ones(args.n)] @ w, 0, 1)
f1 = au_f1_scores(aus, pred)
on = (aus >= L.AU_ON_THRESHOLD).sum(0)
for au in BLIND_AUS:
    j = L.AU_KEYS.index(au)
    prevalence = on[j] / args.n
    print(f"{au}: F1 {f1[f'au_f1_{au}']:.3f} on {args.n} test-identity faces ({on[j]} with the AU on; "
          f"always-on F1 would be {2 * prevalence / (1 + prevalence):.3f})")
