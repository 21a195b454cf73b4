"""Bad input, each case with one clear message, and nothing already written is lost."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from synfer.commands.cli import main
from synfer.engine.dataset import METADATA
from synfer.engine.pipeline import run_recipe
from synfer.engine.recipe import RecipeError, load_recipe


@pytest.mark.parametrize("override,expect", [
    ("num_images=many", ["num_images", "valid integer", "'many'"]),
    ("generator.steps=[1, 2]", ["generator.steps", "valid integer"]),
    ("generator.plugin=sdxl", ["generator.plugin", "no generator named 'sdxl'", "Installed:", "synfer plugins"]),
    ("guidance_classifier.plugin=resnet-fer", ["guidance_classifier.plugin", "'resnet-fer'"]),
    ("generator.model=/no/such/sd15", ["generator.model", "'/no/such/sd15' does not exist", "diffusers SD-family folder", "synfer train generator"]),
    ("guidance_classifier.weights=/no/cnn", ["guidance_classifier.weights", "does not exist", "synfer train classifier"]),
    ("calibrator.weights=/no/feranno", ["calibrator.weights", "does not exist", "synfer train calibrator"]),
    ("num_images=-4", ["num_images", "greater than 0", "-4"]),
    ("generator.batch_size=0", ["generator.batch_size", "greater than 0"]),
    ("expressions={boredom: 1}", ["expressions", "unknown expression 'boredom'", "known: neutral"]),
    ("label_space=rafdb7;expressions={contempt: 1}", ["'contempt' is not in label space rafdb7"]),
])
def test_bad_recipe_one_clear_message(override, expect, tmp_path):
    res = CliRunner().invoke(main, ["validate", "recipes/quickstart.yaml", *override.split(";"), f"output={tmp_path / 'o'}"])
    assert res.exit_code != 0
    assert res.output.count("problem(s)") == 1 and "Traceback" not in res.output
    for word in expect:
        assert word in res.output, (word, res.output)


def test_bad_recipe_leaves_the_dataset_alone(tmp_path, registry):
    """A run that fails validation (here: a missing model folder) touches nothing on disk."""
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "out"
    recipe.write_text(yaml.safe_dump({"seed": 1, "num_images": 6, "output": str(out), "generator": {"plugin": "dummy"}}))
    run_recipe(load_recipe(recipe, registry=registry), registry=registry, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RecipeError, match="generator.model: '/gone' does not exist"):
        load_recipe(recipe, ["generator={plugin: sd, model: /gone}", "num_images=12"], registry=registry)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _img(path, mode, size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def test_messy_source_folder(tmp_path):
    """Corrupt, truncated, grey, CMYK and huge images in an ImageFolder: the readable ones come
    through as RGB, each bad one is skipped with its reason, and the FEText build says so."""
    root = tmp_path / "faces"
    _img(root / "happy" / "rgb.png", "RGB")
    _img(root / "happy" / "grey.png", "L")
    _img(root / "sad" / "cmyk.jpg", "CMYK")
    _img(root / "sad" / "palette.png", "P")
    good = _img(root / "sad" / "full.png", "RGB")
    (root / "sad" / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (root / "anger" / "corrupt.jpg").parent.mkdir(parents=True)
    (root / "anger" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _img(root / "anger" / "huge.png", "RGB", size=(400, 300))
    recipe = tmp_path / "fetext.yaml"
    recipe.write_text(yaml.safe_dump({"output": str(tmp_path / "fetext"), "size": 32,
                                      "sources": [{"plugin": "imagefolder", "root": str(root), "max_pixels": 100_000}],
                                      "au_detector": None}))
    res = CliRunner().invoke(main, ["fetext", "build", str(recipe)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "fetext" / METADATA).read_text().splitlines()]
    assert sorted(r["attributes"]["file"] for r in rows) == ["happy/grey.png", "happy/rgb.png", "sad/cmyk.jpg", "sad/full.png", "sad/palette.png"]
    for r in rows:
        with Image.open(tmp_path / "fetext" / r["file_name"]) as im:
            assert im.mode == "RGB"
    assert "skipped 3 file(s) or row(s) (2 unreadable, 1 too large)" in res.output
    summary = json.loads((tmp_path / "fetext" / "fetext_summary.json").read_text())
    reasons = " | ".join(summary["skipped"])
    assert "truncated.png (unreadable" in reasons and "corrupt.jpg (unreadable" in reasons
    assert "huge.png (too large: 400x300 > max_pixels 100000)" in reasons


def test_checkpoint_of_the_wrong_architecture(tmp_path):
    """A model folder whose weights do not fit its config: one sentence with counts, examples and the fix."""
    from synfer.engine.checkpoints import CheckpointMismatch
    from synfer_plugins.tiny_cnn import build_net, load_net, save_net

    save_net(build_net(8, width=16, size=32), tmp_path / "cnn", {"num_outputs": 8, "width": 16, "size": 32})
    cfg = tmp_path / "cnn" / "config.json"
    cfg.write_text(json.dumps({"num_outputs": 7, "width": 24, "size": 32}))  # e.g. copied from another model
    with pytest.raises(CheckpointMismatch) as err:
        load_net(tmp_path / "cnn")
    msg = str(err.value)
    assert "does not fit this architecture" in msg and "wrong shape" in msg and "checkpoint (8, 3, 3, 3) vs model (12, 3, 3, 3)" in msg and "retrain" in msg
    assert msg.count("\n") == 0


def test_state_dict_of_another_model_lists_missing_and_unexpected(tmp_path):
    import torch

    from synfer.engine.checkpoints import CheckpointMismatch, load_state

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    other = {"encoder.weight": torch.zeros(4, 3), "0.weight": torch.zeros(4, 3)}
    with pytest.raises(CheckpointMismatch, match=r"ckpt.pt does not fit this architecture: 3 missing \(e.g. 0.bias, 1.weight, 1.bias\); "
                                                 r"1 unexpected \(e.g. encoder.weight\)\. Retrain"):
        load_state(net, other, "ckpt.pt", "Retrain.")
    load_state(net, {"0.weight": torch.ones(4, 3)}, "part.pt", "", strict=False)  # non-strict: partial loads are fine
    assert bool((net[0].weight == 1).all())
