"""tiny-cnn / au-cnn: a short training on procedural faces beats chance; save/load round trip."""
import numpy as np
import pytest
import torch

from synfer import labels as L
from synfer.engine.dataset import DatasetWriter


@pytest.fixture(scope="module")
def fetext(tmp_path_factory):
    from synfer_plugins.procedural import ProceduralSource

    root = tmp_path_factory.mktemp("fetext")
    src = ProceduralSource(ProceduralSource.Config(num_images=320, size=32, seed=0, split="train",
                                                   expressions=["happy", "sad", "surprise", "anger"]))
    w = DatasetWriter(root)
    for i, r in enumerate(src.records()):
        w.write(i, r.image, {"expression": r.expression, "aus": r.aus})
    return root


def test_classifier_learns_and_round_trips(fetext, tmp_path):
    from synfer_plugins.tiny_cnn import TinyCNN, evaluate_net, train_from_folder

    net, losses, metrics = train_from_folder(fetext, tmp_path / "m", "classify", "affectnet8", iters=250, batch_size=32,
                                             lr=3e-3, width=16, size=32, test=fetext)
    first, last = np.mean([l for _, l in losses[:10]]), np.mean([l for _, l in losses[-10:]])
    assert last < first * 0.8, (first, last)
    assert metrics["accuracy"] > 0.5  # 4 classes present: chance is 0.25
    clf = TinyCNN(TinyCNN.Config(weights=str(tmp_path / "m")))
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(clf.forward(x), net(x), atol=1e-5)
    assert clf.label_space == "affectnet8"
    x.requires_grad_(True)
    clf.forward(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in clf.net.parameters())


def test_au_detector_trains(fetext, tmp_path):
    from synfer_plugins.tiny_cnn import AUCNN, train_from_folder

    _, losses, metrics = train_from_folder(fetext, tmp_path / "au", "au", iters=60, batch_size=32, lr=3e-3, width=16, size=32, test=fetext)
    assert losses[-1][1] < losses[0][1]
    assert set(metrics["au_f1"]) == set(L.AU_KEYS)
    det = AUCNN(AUCNN.Config(weights=str(tmp_path / "au")))
    from PIL import Image

    out = det.predict_images([Image.new("RGB", (32, 32))] * 2)
    assert out.shape == (2, len(L.AU_KEYS)) and ((0 <= out) & (out <= 1)).all()


def test_missing_weights_say_what_to_run(tmp_path):
    from synfer_plugins.tiny_cnn import TinyCNN

    with pytest.raises(FileNotFoundError, match="synfer train classifier"):
        TinyCNN(TinyCNN.Config(weights=str(tmp_path))).net
