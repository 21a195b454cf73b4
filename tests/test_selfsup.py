"""The self-supervised paradigm (synfer.commands.selfsup): SimCLR pretraining + linear probe, on a toy that is easy to learn."""
import json

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")
from synfer.commands import selfsup  # noqa: E402
from synfer.commands.downstream import SSLConfig  # noqa: E402

from test_benchmark import write_set  # noqa: E402


def test_nt_xent_prefers_matching_views():
    import torch

    z = torch.eye(4) * 5  # 4 images; positive cosine 1, the 6 negatives of each view cosine 0
    aligned = float(selfsup.nt_xent(z, z.clone(), 0.5))
    assert aligned == pytest.approx(np.log(1 + 6 * np.exp(-2.0)), rel=1e-5)  # -log(e^(1/t) / (e^(1/t) + 6)), t = 0.5
    shuffled = float(selfsup.nt_xent(z, z[[1, 2, 3, 0]], 0.5))
    assert shuffled > aligned + 1


def test_augment_keeps_shape_and_range_and_differs_per_view():
    import torch

    x = torch.rand(6, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(0)
    a, b = selfsup.augment(x, g), selfsup.augment(x, g)
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert (a - b).abs().mean() > 0.05


def test_pretraining_lowers_the_loss_and_the_probe_beats_chance():
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3  # class = a colour; SimCLR must keep colour apart despite the jitter
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    x = np.clip(colours[y][:, None, None, :] + rng.normal(0, 25, (120, 16, 16, 3)), 0, 255).astype(np.uint8)
    cfg = SSLConfig(steps=30, batch_size=32, width=8, lr=5e-3)
    enc, losses = selfsup.pretrain(x[:90], cfg, seed=0)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    predict = selfsup.linear_probe(selfsup.embed(enc, x[:90]), y[:90], 3, iters=100, weight_decay=1e-3, seed=0)
    acc = (predict(selfsup.embed(enc, x[90:])) == y[90:]).mean()
    assert acc > 0.8  # chance is 1/3


def test_ssl_command_writes_rows_in_the_downstream_format(tmp_path):
    from click.testing import CliRunner

    from synfer.commands.benchmark import benchmark_cli

    real, syn, test = write_set(tmp_path / "real", 30, 0, False), write_set(tmp_path / "syn", 60, 1, True), write_set(tmp_path / "test", 15, 2, False)
    recipe = tmp_path / "d.yaml"
    recipe.write_text(yaml.safe_dump({"real_train": str(real), "synthetic": str(syn), "real_test": str(test), "real_test_2": str(test),
                                      "real_per_class": 4, "seeds": [0], "size": 16, "output": str(tmp_path / "out"),
                                      "ssl": {"steps": 3, "batch_size": 8, "width": 8, "scales": [1, 2], "probe_iters": 5}}))
    res = CliRunner().invoke(benchmark_cli, ["ssl", str(recipe)])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "out" / "ssl.json").read_text())
    assert result["config"]["real_per_class"] == 4
    got = {(r["setting"], r["scale"]): r["train_images"] for r in result["summary"]}
    assert got == {("ssl-real", 0.0): 12, ("ssl-synthetic", 1): 12, ("ssl-synthetic", 2): 24,
                   ("ssl-real+synthetic", 1): 24, ("ssl-real+synthetic", 2): 36}
    for r in result["summary"]:  # the same test set twice: split 2 scores equal split 1's
        assert 0 <= r["accuracy_mean"] <= 1 and r["test2_accuracy_mean"] == pytest.approx(r["accuracy_mean"])
    assert all(r["probe_images"] == 12 for r in result["runs"])
    assert (tmp_path / "out" / "ssl.png").stat().st_size > 1000
