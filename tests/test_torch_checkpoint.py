"""torch-checkpoint: a tiny seeded classifier saved as torch.export, TorchScript, safetensors and .pt loads identically."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from synfer.labels import LABEL_SPACES  # noqa: E402
from synfer_plugins.torch_checkpoint import TorchCheckpoint, register_stages  # noqa: E402

TINY = textwrap.dedent('''
    import torch
    from torch import nn


    class TinyFER(nn.Module):
        def __init__(self, channels: int = 3, classes: int = 7, width: int = 8):
            super().__init__()
            self.conv = nn.Conv2d(channels, width, 3, padding=1)
            self.norm = nn.BatchNorm2d(width)
            self.head = nn.Linear(width, classes)

        def forward(self, x):
            return self.head(torch.relu(self.norm(self.conv(x))).mean(dim=(-2, -1)))
''')

# TorchScript is deprecated in torch >= 2.10 but still the commonest format people hold.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

MEAN, STD, SIZE = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3], 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, files): a seeded TinyFER importable as `synfer_tiny_fer:TinyFER`, saved four ways."""
    import importlib
    import sys

    tmp_path = tmp_path_factory.mktemp("tiny")
    (tmp_path / "synfer_tiny_fer.py").write_text(TINY)
    sys.path.insert(0, str(tmp_path))

    mod = importlib.import_module("synfer_tiny_fer")
    torch.manual_seed(0)
    model = mod.TinyFER(width=6).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a lost buffer would show
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    from safetensors.torch import save_file

    files = {"export": tmp_path / "tiny.pt2", "script": tmp_path / "tiny.torchscript.pt", "safetensors": tmp_path / "tiny.safetensors", "pt": tmp_path / "tiny.pt"}
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.zeros(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(files["export"]))
    torch.jit.script(model).save(str(files["script"]))
    save_file(model.state_dict(), str(files["safetensors"]))
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, files["pt"])
    yield model, files
    sys.path.remove(str(tmp_path))
    sys.modules.pop("synfer_tiny_fer", None)


def _reference(model, x):
    """What the plugin must compute: [-1, 1] -> [0, 1] -> resize -> (x - mean) / std -> model."""
    x = (x + 1) / 2
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=x.shape[-1] > SIZE)
    return model((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))


def _configs(files):
    common = dict(label_space="fer2013", size=SIZE, mean=MEAN, std=STD)
    module = dict(module="synfer_tiny_fer:TinyFER", kwargs={"width": 6})
    return {
        "export": TorchCheckpoint.Config(path=str(files["export"]), **common),
        "script": TorchCheckpoint.Config(path=str(files["script"]), **common),
        "safetensors": TorchCheckpoint.Config(path=str(files["safetensors"]), **module, **common),
        "pt": TorchCheckpoint.Config(path=str(files["pt"]), key="state_dict", **module, **common),
    }


def test_registered_by_hook():
    found = []
    register_stages(register=found.append)
    assert found == [TorchCheckpoint] and TorchCheckpoint.kind == "guidance_classifier"


def test_four_formats_match_the_model(tiny):
    model, files = tiny
    x = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = _reference(model, x)
    for fmt, config in _configs(files).items():
        clf = TorchCheckpoint(config)
        assert clf.label_space == "fer2013"
        with torch.no_grad():
            got = clf.forward(x)
        assert got.shape == (3, 7)
        assert torch.allclose(got, expected, atol=1e-6), fmt


def test_construction_does_not_load(tiny, tmp_path):
    clf = TorchCheckpoint(TorchCheckpoint.Config(path=str(tmp_path / "later.pt"), label_space="fer2013"))
    assert clf._model is None
    with pytest.raises(FileNotFoundError, match="later.pt"):
        clf.forward(torch.zeros(1, 3, 8, 8))


def test_classes_reorder_into_label_space(tiny):
    """A model whose outputs are in RAF-DB order, spelled its own way, serves the fer2013 space."""
    model, files = tiny
    raf_spelled = ["Surprise", "Fearful", "Disgusted", "Happiness", "Sadness", "Angry", "Neutral"]
    clf = TorchCheckpoint(TorchCheckpoint.Config(path=str(files["script"]), label_space="fer2013", classes=raf_spelled,
                                                 size=SIZE, mean=MEAN, std=STD))
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        raw, got = _reference(model, x), clf.forward(x)
    for j, name in enumerate(LABEL_SPACES["fer2013"]):
        assert torch.allclose(got[:, j], raw[:, LABEL_SPACES["rafdb7"].index(name)])


def test_grey_and_gradients(tiny, tmp_path):
    model, _ = tiny
    import synfer_tiny_fer

    torch.manual_seed(4)
    grey_model = synfer_tiny_fer.TinyFER(channels=1, classes=8)
    torch.jit.script(grey_model).save(str(tmp_path / "grey.pt"))
    clf = TorchCheckpoint(TorchCheckpoint.Config(path=str(tmp_path / "grey.pt"), label_space="affectnet8", grey=True, size=16))
    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1).requires_grad_(True)
    logits = clf.forward(x)
    assert logits.shape == (2, 8)
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in clf.model.parameters())


def test_predict_votes_with_probabilities(tiny):
    from PIL import Image

    _, files = tiny
    clf = TorchCheckpoint(_configs(files)["safetensors"])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)) for _ in range(3)]
    probs = clf.predict(images)
    assert probs.shape == (3, 7) and np.allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_output_count_mismatch_is_explained(tiny):
    _, files = tiny
    clf = TorchCheckpoint(TorchCheckpoint.Config(path=str(files["script"]), label_space="affectnet8"))
    with pytest.raises(ValueError, match="7 outputs"):
        clf.forward(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("bad, message", [
    (dict(label_space="fer13"), "no label space 'fer13'"),
    (dict(classes=["anger", "happy"]), "lack"),
    (dict(classes=["anger", "grumpy"]), "unknown expression 'grumpy'"),
    (dict(module="pkg.mod.Class"), "pkg.mod:ClassName"),
    (dict(path="w.safetensors"), "set module"),
    (dict(mean=[0.1, 0.2]), "mean has 2 values"),
    (dict(std=[0.0]), "must not contain 0"),
    (dict(typo=1), "Extra inputs are not permitted"),
])
def test_config_errors_name_the_problem(bad, message):
    kwargs = dict(path="model.pt", label_space="fer2013") | bad
    with pytest.raises(ValidationError, match=message):
        TorchCheckpoint.Config(**kwargs)
