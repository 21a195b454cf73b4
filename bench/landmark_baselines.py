"""Neutral baselines of the landmark AU detector: median geometric ratios over skimage's lfw_subset faces.

    SYNFER_CACHE=... python bench/landmark_baselines.py   (needs 'synfer models fetch face-mesh' and retinaface)

The 100 LFW faces (25 x 25) are upscaled 4x (bicubic), found and aligned by RetinaFace, meshed,
and `synfer_plugins.landmark_aus.features` is taken per face; the medians are the baselines in
AU_GEOMETRY (corner_lift's is 0 by definition).
"""
import numpy as np
from PIL import Image
from skimage import data

from synfer_plugins.landmark_aus import LandmarkAUDetector, features

images = [Image.fromarray((a * 255).astype(np.uint8)).convert("RGB").resize((100, 100), Image.BICUBIC)
          for a in data.lfw_subset()[:100]]
points, presence = LandmarkAUDetector().landmarks(images)
feats = [features(p) for p, s in zip(points, presence) if s > 0.5]
print(f"{len(feats)} of {len(images)} faces meshed")
for key in feats[0]:
    print(f"{key:<12} median {np.median([f[key] for f in feats]):.4f}")
