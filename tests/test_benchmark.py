"""Downstream benchmark (paper 5.2, Fig. 6): end to end on a tiny setting, plus its scoring."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from synfer.engine.dataset import DatasetWriter

bench = pytest.importorskip("synfer.commands.downstream")
from synfer.commands.benchmark import benchmark_cli  # noqa: E402
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
    res = CliRunner().invoke(benchmark_cli, ["downstream", str(recipe), "scales=[2]", f"output={tmp_path / 'out'}"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert len(result["runs"]) == 6  # (real, synthetic, real+synthetic) x two seeds
    got = {(r["setting"], r["scale"]): r["train_images"] for r in result["summary"]}
    assert got == {("real", 0.0): 12, ("synthetic", 2): 24, ("real+synthetic", 2): 48}  # mix: balanced, the default: 12 real x 2 + 24
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


def test_runs_in_parts_merge_into_the_run_of_all(tmp_path):
    """Settings run side by side, then `synfer benchmark merge`: the same rows as one run of them all."""
    from click.testing import CliRunner

    real, syn, test = write_set(tmp_path / "real", 30, 0, False), write_set(tmp_path / "syn", 60, 1, True), write_set(tmp_path / "test", 15, 2, False)
    recipe = tmp_path / "downstream.yaml"
    recipe.write_text(yaml.safe_dump({"real_train": str(real), "synthetic": str(syn), "real_test": str(test),
                                      "real_per_class": 4, "scales": [1], "seeds": [0], "iters": 3,
                                      "batch_size": 8, "size": 16, "width": 8, "threads": 1}))
    run = lambda *args: CliRunner().invoke(benchmark_cli, [*args], catch_exceptions=False)
    assert run("downstream", str(recipe), f"output={tmp_path / 'all'}").exit_code == 0
    assert run("downstream", str(recipe), "settings=[real,synthetic]", f"output={tmp_path / 'a'}").exit_code == 0
    assert run("downstream", str(recipe), "settings=[real+synthetic]", f"output={tmp_path / 'b'}").exit_code == 0
    res = run("merge", str(tmp_path / "a" / "downstream.json"), str(tmp_path / "b" / "downstream.json"), "--output", str(tmp_path / "m"))
    assert res.exit_code == 0, res.output
    merged, whole = (json.loads((tmp_path / d / "downstream.json").read_text()) for d in ("m", "all"))
    assert merged["summary"] == whole["summary"]  # every row, to the last digit
    assert merged["config"]["settings"] == ["real", "synthetic", "real+synthetic"]
    assert (tmp_path / "m" / "downstream.png").exists()
    res = run("merge", str(tmp_path / "a" / "downstream.json"), str(tmp_path / "all" / "downstream.json"), "--output", str(tmp_path / "x"))
    assert res.exit_code != 0 and "more than one run" in res.output  # the same row twice
    other = json.loads((tmp_path / "b" / "downstream.json").read_text())
    other["config"]["real_per_class"] = 5
    (tmp_path / "b2.json").write_text(json.dumps(other))
    res = run("merge", str(tmp_path / "a" / "downstream.json"), str(tmp_path / "b2.json"), "--output", str(tmp_path / "y"))
    assert res.exit_code != 0 and "differ in real_per_class" in res.output


def test_downstream_config_is_strict(tmp_path):
    from synfer.engine.recipe import RecipeError

    recipe = tmp_path / "d.yaml"
    recipe.write_text("real_train: a\nsynthetic: b\nreal_test: c\n")
    with pytest.raises(RecipeError) as err:
        bench.load_config(recipe, ["itres=5", "scales=[0]"])
    assert "itres" in str(err.value) and "scales" in str(err.value)
    shipped = Path(__file__).parents[1] / "recipes" / "downstream.yaml"
    assert bench.load_config(shipped).scales == [1, 2, 5]


def test_uar_on_a_known_confusion():
    # confusion (rows true, cols predicted): class 0: 6 right, 2 as 1; class 1: 1 right, 1 as 0; class 2: 2 right
    y = np.array([0] * 8 + [1] * 2 + [2] * 2)
    p = np.array([0] * 6 + [1] * 2 + [1, 0] + [2, 2])
    out = bench.scores(y, p, 3)
    assert out["accuracy"] == pytest.approx(9 / 12)
    assert out["uar"] == pytest.approx((6 / 8 + 1 / 2 + 1) / 3)  # 0.75: the small class counts as much as the large one


def test_second_split_is_scored_by_the_same_models(tmp_path):
    from click.testing import CliRunner

    real, syn, test = write_set(tmp_path / "real", 30, 0, False), write_set(tmp_path / "syn", 60, 1, True), write_set(tmp_path / "test", 15, 2, False)
    test2 = write_set(tmp_path / "test2", 9, 7, False)
    recipe = tmp_path / "downstream.yaml"
    recipe.write_text(yaml.safe_dump({"real_train": str(real), "synthetic": str(syn), "real_test": str(test), "real_test_2": str(test2),
                                      "real_per_class": 4, "scales": [1], "seeds": [0, 1], "iters": 3, "batch_size": 8, "size": 16, "width": 8,
                                      "settings": ["real", "real+synthetic"], "output": str(tmp_path / "out")}))
    res = CliRunner().invoke(benchmark_cli, ["downstream", str(recipe)])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert [(r["setting"], r["seed"]) for r in result["runs"]] == [("real", 0), ("real+synthetic", 0), ("real", 1), ("real+synthetic", 1)]
    assert result["counts"]["real_test_2"] == 9
    for r in result["runs"]:  # split 2 has 9 images: every accuracy is a multiple of 1/9
        assert round(r["test2_accuracy"] * 9, 6) == round(r["test2_accuracy"] * 9)
    for r in result["summary"]:
        v = [x["test2_uar"] for x in result["runs"] if x["setting"] == r["setting"]]
        assert r["test2_uar_mean"] == pytest.approx(np.mean(v)) and r["test2_uar_std"] == pytest.approx(np.std(v))
    assert "split 2 acc" in res.output


def test_data_rich_regime_checks_coverage(tmp_path):
    """real_per_class 250 at 5x needs 1,250 synthetic per class: a short set fails with what to do, or trains on fewer if allowed."""
    import click

    shipped = Path(__file__).parents[1] / "recipes" / "downstream.yaml"
    cfg = bench.load_config(shipped, ["real_per_class=250"])
    assert cfg.real_per_class == 250 and cfg.scales == [1, 2, 5]
    y_real = np.repeat(np.arange(8), 300)
    y_syn = np.repeat(np.arange(8), 260)
    with pytest.raises(click.ClickException) as err:
        bench.check_coverage(cfg, y_real, y_syn, cfg.scales, echo=lambda m: None)
    assert "fewer than 1250" in err.value.message and "allow_short" in err.value.message
    assert bench.check_coverage(cfg, y_real, y_syn, [1], echo=lambda m: None) == []  # 1x needs 250 per class: covered
    said = []
    short = bench.check_coverage(bench.load_config(shipped, ["real_per_class=250", "allow_short=true"]), y_real[:2000], y_syn, [2], said.append)
    assert len(short) == 2 and len(said) == 2  # real 250 per class and synthetic 500 per class both short, both said
    with pytest.raises(Exception):
        bench.load_config(shipped, ["mix=half"])


def test_balanced_mix_and_confidence_filter(tmp_path):
    x_r, y_r = np.zeros((10, 4, 4, 3), np.uint8), np.arange(10) % 2
    x_s, y_s = np.ones((50, 4, 4, 3), np.uint8), np.arange(50) % 2
    x, y = bench.compose("real+synthetic", x_r, y_r, x_s, y_s, "balanced")
    assert len(y) == 100 and (x[:, 0, 0, 0] == 0).sum() == 50  # real repeated 5x: half of every batch, in expectation
    assert len(bench.compose("real+synthetic", x_r, y_r, x_s, y_s, "concat")[1]) == 60
    syn = write_set(tmp_path / "syn", 12, 1, True)
    rows = [json.loads(line) for line in (syn / "metadata.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):  # soft labels: top probability 0.9 for even indices, 0.4 for odd
        r["soft_label"] = [0.9, 0.1] if i % 2 == 0 else [0.4, 0.3, 0.3]
    (syn / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    real = write_set(tmp_path / "real", 6, 0, False)
    base = {"real_train": str(real), "synthetic": str(syn), "real_test": str(real), "size": 16}
    recipe = tmp_path / "d.yaml"
    recipe.write_text(yaml.safe_dump(base))
    kept = [i for i in range(12) if i % 7 != 3]
    n_all = len(bench.load_sets(bench.load_config(recipe), echo=lambda m: None)[1][1])
    n_conf = len(bench.load_sets(bench.load_config(recipe, ["synthetic_min_confidence=0.5"]), echo=lambda m: None)[1][1])
    assert n_all == len(kept) and n_conf == len([i for i in kept if i % 2 == 0])


def test_soft_label_targets(tmp_path):
    """synthetic_targets: soft_label trains the synthetic images on their soft labels and the real ones on one-hot rows;
    the real-only setting keeps class indices, and tiny-cnn trains on probability targets."""
    x_r, y_r = np.zeros((4, 16, 16, 3), np.uint8), np.array([0, 1, 0, 1])
    x_s, y_s = np.full((4, 16, 16, 3), 200, np.uint8), np.array([1, 1, 0, 0])
    p_s = np.array([[0.2, 0.8], [0.1, 0.9], [0.7, 0.3], [0.6, 0.4]], np.float32)
    x, y = bench.compose("real+synthetic", x_r, y_r, x_s, y_s, "concat", p_s)
    assert y.shape == (8, 2) and np.array_equal(y[:4], np.eye(2)[y_r]) and np.array_equal(y[4:], p_s)
    assert np.array_equal(bench.compose("synthetic", x_r, y_r, x_s, y_s, "concat", p_s)[1], p_s)
    assert np.array_equal(bench.compose("real", x_r, y_r, x_s, y_s, "concat", p_s)[1], y_r)
    from synfer.engine.arrays import soft_targets

    rows = [{"soft_label": [1, 3]}, {}, {"soft_label": [0.5, 0.25, 0.25]}]
    assert np.allclose(soft_targets(rows, np.array([0, 1, 0]), 2), [[0.25, 0.75], [0, 1], [1, 0]])
    predict = bench.trainable("tiny-cnn").fit_arrays(x, y, 2, iters=3, batch_size=4, lr=1e-3, seed=0, size=16, width=4, threads=1)
    assert predict(x).shape == (8, 2)
    syn = write_set(tmp_path / "syn", 12, 1, True)
    real = write_set(tmp_path / "real", 6, 0, False)
    recipe = tmp_path / "d.yaml"
    recipe.write_text(yaml.safe_dump({"real_train": str(real), "synthetic": str(syn), "real_test": str(real), "size": 16}))
    _, (_, y_syn, p_syn), _ = bench.load_sets(bench.load_config(recipe, ["synthetic_targets=soft_label"]), echo=lambda m: None)
    assert p_syn.shape == (len(y_syn), 8) and np.allclose(p_syn.sum(1), 1)
    assert bench.load_sets(bench.load_config(recipe, ["synthetic_targets=label"]), echo=lambda m: None)[1][2] is None
