"""Downstream benchmark (paper 5.2, Fig. 6): end to end on a tiny setting, plus its scoring."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from synfer.dataset import DatasetWriter

bench = pytest.importorskip("synfer.benchmark")
CLASSES = ("neutral", "happy", "sad")


def write_set(root, n, seed, generated):
    """Class c = a flat colour plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    w = DatasetWriter(root)
    for i in range(n):
        c = i % len(CLASSES)
        img = np.clip(np.full((16, 16, 3), 60 + 70 * c) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        row = {"label": CLASSES[c], "preassigned_label": CLASSES[c], "kept": i % 7 != 3} if generated else {"expression": CLASSES[c]}
        w.write(i, Image.fromarray(img), row)
    return root


def test_scores_accuracy_and_uar():
    y = np.array([0, 0, 0, 1])
    p = np.array([0, 0, 0, 0])
    out = bench.scores(y, p, 3)
    assert out["accuracy"] == 0.75 and out["uar"] == 0.5  # class 2 absent from the test set: not averaged


def test_per_class_subset_is_balanced():
    y = np.array([0] * 10 + [1] * 3)
    idx = bench.per_class_subset(y, 4, np.random.default_rng(0))
    assert (y[idx] == 0).sum() == 4 and (y[idx] == 1).sum() == 3
    bigger = bench.per_class_subset(y, 8, np.random.default_rng(0))
    assert set(idx) <= set(bigger)  # same seed: a larger scale extends the smaller subset


def test_downstream_end_to_end(tmp_path):
    from click.testing import CliRunner

    real, syn, test = write_set(tmp_path / "real", 30, 0, False), write_set(tmp_path / "syn", 60, 1, True), write_set(tmp_path / "test", 15, 2, False)
    recipe = tmp_path / "downstream.yaml"
    recipe.write_text(yaml.safe_dump({"real_train": str(real), "synthetic": str(syn), "real_test": str(test),
                                      "real_per_class": 4, "scales": [1, 2], "seeds": [0, 1], "iters": 3,
                                      "batch_size": 8, "size": 16, "width": 8}))
    res = CliRunner().invoke(bench.benchmark_cli, ["downstream", str(recipe), "scales=[2]", f"output={tmp_path / 'out'}"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert len(result["runs"]) == 6  # (real, synthetic, real+synthetic) x two seeds
    got = {(r["setting"], r["scale"]): r["train_images"] for r in result["summary"]}
    assert got == {("real", 0.0): 12, ("synthetic", 2): 24, ("real+synthetic", 2): 36}
    for r in result["summary"]:  # mean and std over the two seeds' runs, exactly
        runs = [x for x in result["runs"] if (x["setting"], x["scale"]) == (r["setting"], r["scale"])]
        assert sorted(x["seed"] for x in runs) == [0, 1] and r["seeds"] == 2
        for m in ("accuracy", "uar"):
            v = np.array([x[m] for x in runs])
            assert r[f"{m}_mean"] == pytest.approx(v.mean()) and r[f"{m}_std"] == pytest.approx(v.std())
    # every accuracy is a share of the 15 test images
    assert all(round(x["accuracy"] * 15, 6) == round(x["accuracy"] * 15) for x in result["runs"])
    with Image.open(tmp_path / "out" / "downstream.png") as im:
        assert im.size[0] > 300
    assert "real+synthetic" in res.output and "UAR" in res.output


def test_downstream_config_is_strict(tmp_path):
    from synfer.recipe import RecipeError

    recipe = tmp_path / "d.yaml"
    recipe.write_text("real_train: a\nsynthetic: b\nreal_test: c\n")
    with pytest.raises(RecipeError) as err:
        bench.load_config(recipe, ["itres=5", "scales=[0]"])
    assert "itres" in str(err.value) and "scales" in str(err.value)
    shipped = Path(__file__).parents[1] / "recipes" / "downstream.yaml"
    assert bench.load_config(shipped).scales == [1, 2, 5]
