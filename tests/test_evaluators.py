"""Evaluator plugins: FID, FER accuracy, AU F1, diversity, label quality, and `synfer eval`.

Judges are either tiny random nets saved to tmp folders (the real plugin path) or tiny
stages defined here whose verdicts are known, so the numbers are checked by hand.
"""
import json
import types

import numpy as np
import pytest
from PIL import Image

from synfer import hookimpl
from synfer import labels as L
from synfer.engine.dataset import DatasetWriter
from synfer.stages import AUDetector, GuidanceClassifier, StageConfig

ev = pytest.importorskip("synfer_plugins.evaluators")
tiny = pytest.importorskip("synfer_plugins.tiny_cnn")

RED, BLUE = (220, 30, 30), (30, 30, 220)


class ColorJudge(GuidanceClassifier):
    """Says 'happy' for reddish images, 'sad' otherwise."""

    name = "test-color-judge"
    label_space = "affectnet8"

    def forward(self, images):
        import torch

        red = (images[:, 0] > images[:, 2]).flatten(1).float().mean(1)
        logits = torch.zeros(len(images), 8)
        logits[:, 1], logits[:, 2] = red, 1 - red
        return logits


class GreyAUJudge(AUDetector):
    """Reads AU intensities off the image: pixel value v of image -> AUs from TABLE[v]."""

    name = "test-grey-au"
    TABLE: dict[int, dict[str, float]] = {}

    class Config(StageConfig):
        device: str = "cpu"

    def detect(self, records):
        return [self.TABLE[int(np.asarray(r.image)[0, 0, 0])] for r in records]


@hookimpl
def _register_judges(register):
    register(ColorJudge)
    register(GreyAUJudge)


JUDGES = types.ModuleType("evaluator_test_judges")
JUDGES.register_stages = _register_judges


@pytest.fixture(autouse=True)
def judges():
    """Make the tiny-cnn plugins and the test judges visible to the evaluators' registry."""
    from synfer.engine.registry import get_registry

    reg = get_registry()
    reg.add(JUDGES, provider="tests")  # no-op once registered
    if ("guidance_classifier", "oracle-cnn") not in reg.plugins:
        reg.add(tiny, provider="tests")
    return reg


def random_net(folder, outputs=8, seed=0):
    import torch

    torch.manual_seed(seed)
    net = tiny.build_net(outputs, width=8, size=32)
    net.eval()
    return str(tiny.save_net(net, folder, {"num_outputs": outputs, "width": 8, "size": 32, "label_space": "affectnet8"}))


def write_set(root, images, rows):
    w = DatasetWriter(root)
    for i, (im, r) in enumerate(zip(images, rows)):
        w.write(i, Image.fromarray(np.asarray(im, np.uint8)), r)
    return root


def noise_images(n, seed=0, shift=0, size=32):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, size, size, 3))
    return np.clip(base + shift, 0, 255).astype(np.uint8)


def gen_row(label, pre=None, kept=True, aus=None):
    return {"label": label, "preassigned_label": pre or label, "kept": kept, "aus": aus or {}}


# ---------------------------------------------------------------- FID


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert ev.frechet_distance(a, a) < 1e-9
    b = a + np.array([2.0, 0, 0])  # a pure mean shift: FID = |shift|^2
    assert ev.frechet_distance(a, b) == pytest.approx(4.0, rel=1e-6)


def test_fid_self_zero_shifted_positive(tmp_path):
    weights = random_net(tmp_path / "oracle")
    imgs = noise_images(40)
    a = write_set(tmp_path / "a", imgs, [gen_row("happy")] * 40)
    b = write_set(tmp_path / "b", noise_images(40, shift=60), [gen_row("happy")] * 40)
    fid = ev.FID(ev.FID.Config(judge={"plugin": "oracle-cnn", "weights": weights}))
    same = fid.evaluate(a, a)
    shifted = fid.evaluate(a, b)
    assert same["fid"] < 1e-6 and same["fid_images"] == 40
    assert shifted["fid"] > 1e4 * max(same["fid"], 1e-15)  # random-net features are small: compare, not absolute
    pixels = ev.FID(ev.FID.Config(extractor="pixels", extractor_size=8, reference=str(b)))
    assert pixels.evaluate(a)["fid"] > pixels.evaluate(a, a)["fid"]


def test_fid_needs_reference_and_inception_file(tmp_path):
    a = write_set(tmp_path / "a", noise_images(4), [gen_row("happy")] * 4)
    with pytest.raises(ValueError, match="reference"):
        ev.FID().evaluate(a)
    with pytest.raises(FileNotFoundError, match="TorchScript"):
        ev.FID(ev.FID.Config(extractor="inception", extractor_path=str(tmp_path / "none.pt"))).evaluate(a, a)


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_fid_inception_torchscript_path(tmp_path):
    import torch

    class Pool(torch.nn.Module):  # stands in for a TorchScript Inception: [0, 255] RGB -> features
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    path = tmp_path / "incep.pt"
    torch.jit.script(Pool()).save(str(path))
    a = write_set(tmp_path / "a", noise_images(30), [gen_row("happy")] * 30)
    b = write_set(tmp_path / "b", noise_images(30, 1, shift=50), [gen_row("happy")] * 30)
    fid = ev.FID(ev.FID.Config(extractor="inception", extractor_path=str(path), extractor_size=16))
    assert fid.evaluate(a, a)["fid"] < 1e-6 < fid.evaluate(a, b)["fid"]


# ---------------------------------------------------------------- FER accuracy


def test_fer_accuracy_hand_computed(tmp_path):
    # happy: 3 red (judge: happy) -> 3/3; sad: 1 red + 2 blue -> 2/3; one dropped blue 'happy' is ignored
    colours = [RED, RED, RED, RED, BLUE, BLUE, BLUE]
    rows = [gen_row("happy")] * 3 + [gen_row("sad"), gen_row("sad"), gen_row("sad"), gen_row("happy", kept=False)]
    d = write_set(tmp_path / "d", [np.full((16, 16, 3), c) for c in colours], rows)
    out = ev.FERAccuracy(ev.FERAccuracy.Config(judge="test-color-judge")).evaluate(d)
    assert out["fer_accuracy"] == pytest.approx(5 / 6)
    assert out["fer_accuracy_happy"] == 1.0 and out["fer_accuracy_sad"] == pytest.approx(2 / 3)
    assert out["fer_accuracy_n"] == 6


def test_fer_accuracy_with_random_oracle_matches_direct_prediction(tmp_path):
    weights = random_net(tmp_path / "oracle", seed=3)
    classes = L.label_space("affectnet8")
    labels = [classes[i % 8] for i in range(24)]
    d = write_set(tmp_path / "d", noise_images(24, 2), [gen_row(c) for c in labels])
    out = ev.FERAccuracy(ev.FERAccuracy.Config(judge={"plugin": "oracle-cnn", "weights": weights})).evaluate(d)
    net, _ = tiny.load_net(weights)
    pred = tiny.predict_logits(net, noise_images(24, 2)).argmax(1)
    assert out["fer_accuracy"] == pytest.approx(np.mean([classes[p] == c for p, c in zip(pred, labels)]))


def test_fer_accuracy_skips_labels_outside_the_judges_space():
    out = ev.fer_accuracy_scores(["happy", "contempt", "sad"], ["happy", None, "happy"])
    assert out["fer_accuracy"] == 0.5 and out["fer_accuracy_unscored"] == 1


# ---------------------------------------------------------------- AU F1


def test_au_f1_binarises_at_threshold():
    t = np.zeros((4, len(L.AU_KEYS)))
    p = np.zeros_like(t)
    j6, j12 = L.AU_KEYS.index("AU6"), L.AU_KEYS.index("AU12")
    t[:, j12] = [0.9, 0.9, 0.1, 0.1]
    p[:, j12] = [L.AU_ON_THRESHOLD, 0.24, 0.6, 0.0]  # exactly at the threshold counts as on
    t[:, j6] = [0.5, 0.0, 0.0, 0.0]
    p[:, j6] = [0.5, 0.0, 0.0, 0.0]
    out = ev.au_f1_scores(t, p)
    assert out["au_f1_AU12"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # tp 1, fn 1, fp 1
    assert out["au_f1_AU6"] == 1.0
    assert "au_f1_AU1" not in out  # never on in either: undefined, left out of the mean
    assert out["au_f1"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["au_accuracy"] == pytest.approx(1 - 2 / t.size)


def test_au_accuracy_evaluator(tmp_path):
    GreyAUJudge.TABLE = {10: {"AU12": 0.8}, 20: {"AU12": 0.1, "AU6": 0.7}, 30: {}}
    rows = [gen_row("happy", aus={"AU6": 0.6, "AU12": 0.9}), gen_row("happy", aus={"AU6": 0.9, "AU12": 0.9}),
            gen_row("neutral", aus={"AU1": 0.0})]
    d = write_set(tmp_path / "d", [np.full((8, 8, 3), v) for v in (10, 20, 30)], rows)
    out = ev.AUAccuracy(ev.AUAccuracy.Config(judge="test-grey-au")).evaluate(d)
    # AU12: tp 1 (img 10), fn 1 (img 20) -> 2/3; AU6: tp 1 (img 20), fn 1 (img 10) -> 2/3
    assert out["au_f1_AU12"] == pytest.approx(2 / 3) and out["au_f1_AU6"] == pytest.approx(2 / 3)
    assert out["au_f1"] == pytest.approx(2 / 3) and out["au_images"] == 3


def test_au_accuracy_with_random_au_cnn(tmp_path):
    weights = random_net(tmp_path / "au", outputs=len(L.AU_KEYS))
    rows = [gen_row("happy", aus={"AU6": 0.8, "AU12": 0.9})] * 6
    d = write_set(tmp_path / "d", noise_images(6), rows)
    out = ev.AUAccuracy(ev.AUAccuracy.Config(judge={"plugin": "au-cnn", "weights": weights})).evaluate(d)
    # exactly the scores of the net's own predictions against the requested AUs
    judge = ev.build_plugin({"plugin": "au-cnn", "weights": weights}, ("au_detector",), "cpu")
    pred = judge.predict_images(ev.load_images(d, ev.dataset_rows(d)))
    expect = ev.au_f1_scores(np.stack([L.au_vector(r["aus"]) for r in rows]), pred)
    assert out["au_images"] == 6 and set(out) == set(expect) | {"au_images"}
    assert all(out[k] == pytest.approx(v) for k, v in expect.items())


# ---------------------------------------------------------------- diversity


def test_diversity_zero_for_identical_images(tmp_path):
    weights = random_net(tmp_path / "oracle")
    cfg = dict(judge={"plugin": "oracle-cnn", "weights": weights})
    same = write_set(tmp_path / "same", [noise_images(1)[0]] * 6, [gen_row("happy")] * 3 + [gen_row("sad")] * 3)
    varied = write_set(tmp_path / "varied", noise_images(6, 5), [gen_row("happy")] * 3 + [gen_row("sad")] * 3)
    d0 = ev.Diversity(ev.Diversity.Config(**cfg)).evaluate(same)
    d1 = ev.Diversity(ev.Diversity.Config(**cfg)).evaluate(varied)
    assert d0["diversity"] == pytest.approx(0.0, abs=1e-9) and set(d0) == {"diversity", "diversity_happy", "diversity_sad"}
    assert d1["diversity"] > 1e-6
    assert d1["diversity"] == pytest.approx((d1["diversity_happy"] + d1["diversity_sad"]) / 2)


def test_mean_pairwise_distance():
    f = np.array([[1.0, 0], [0, 1.0], [2.0, 0]])
    assert ev.mean_pairwise_distance(f, "cosine") == pytest.approx((1 + 0 + 1) / 3)
    assert ev.mean_pairwise_distance(f, "euclidean") == pytest.approx((np.sqrt(2) + 1 + np.sqrt(5)) / 3)


# ---------------------------------------------------------------- label quality


def test_label_quality_hand_made_rows():
    rows = [
        gen_row("happy", "happy"),            # judge happy: both right
        gen_row("sad", "happy"),              # relabelled; judge sad: final right, preassigned wrong
        gen_row("anger", "fear"),             # relabelled; judge fear: final wrong
        gen_row("sad", "sad", kept=False),    # dropped; judge happy: both wrong
    ]
    out = ev.label_quality_scores(rows, ["happy", "sad", "fear", "happy"])
    assert out["label_quality_preassigned"] == pytest.approx(2 / 3)
    assert out["label_quality_final"] == pytest.approx(2 / 3) == out["label_quality"]
    assert out["label_quality_preassigned_all"] == pytest.approx(2 / 4)
    assert out["label_quality_final_all"] == pytest.approx(2 / 4)
    assert out["label_quality_relabelled"] == 2 and out["label_quality_relabelled_fixed"] == 0.5
    assert out["label_quality_kept_share"] == 0.75


def test_label_quality_evaluator(tmp_path):
    rows = [gen_row("happy", "sad"), gen_row("happy", "happy"), gen_row("sad", "happy"), gen_row("sad", kept=False)]
    d = write_set(tmp_path / "d", [np.full((8, 8, 3), c) for c in (RED, RED, BLUE, RED)], rows)
    out = ev.LabelQuality(ev.LabelQuality.Config(judge="test-color-judge")).evaluate(d)
    assert out["label_quality_final"] == 1.0 and out["label_quality_preassigned"] == pytest.approx(1 / 3)
    assert out["label_quality_final_all"] == 0.75
    real = write_set(tmp_path / "real", [np.full((8, 8, 3), RED)], [{"expression": "happy"}])
    assert ev.LabelQuality(ev.LabelQuality.Config(judge="test-color-judge")).evaluate(real) == {}


# ---------------------------------------------------------------- synfer eval


def test_eval_cli_merges_metrics(tmp_path):
    from click.testing import CliRunner

    from synfer.commands.eval import eval_cli

    weights = random_net(tmp_path / "oracle")
    d = write_set(tmp_path / "d", [np.full((8, 8, 3), c) for c in (RED, BLUE, RED, BLUE)],
                  [gen_row("happy"), gen_row("sad"), gen_row("sad", "happy"), gen_row("sad")])
    ref = write_set(tmp_path / "ref", noise_images(4, 9, size=8), [{"expression": "happy"}] * 4)
    (d / "metrics.json").write_text(json.dumps({"earlier": 1.5, "fer_accuracy": -1}))
    res = CliRunner().invoke(eval_cli, [str(d), "--reference", str(ref), "--evaluators", "fid,fer-accuracy,diversity,label-quality",
                                        "-o", f"fid.judge.weights={weights}", "-o", "fid.judge.plugin=oracle-cnn",
                                        "-o", "fer-accuracy.judge=test-color-judge", "-o", "label-quality.judge=test-color-judge",
                                        "-o", "diversity.extractor=pixels", "-o", "diversity.extractor_size=4"])
    assert res.exit_code == 0, res.output
    assert "not comparable with Inception" in res.output  # the offline FID says what it measured on
    m = json.loads((d / "metrics.json").read_text())
    assert m["earlier"] == 1.5 and m["fer_accuracy"] == 0.75
    for key in ("fid", "fer_accuracy", "diversity", "label_quality"):
        assert key in m
    bad = CliRunner().invoke(eval_cli, [str(d), "--evaluators", "fer-accuracy", "-o", "fer-accuracy.jugde=x"])
    assert bad.exit_code != 0 and "jugde" in bad.output
