"""A resume that knows its recipe (issue 20, item 5): `<output>/recipe.json` is written on the
first run; a rerun that would draw other samples stops naming the keys; `--force` continues."""
import json

import pytest
import yaml
from click.testing import CliRunner

from synfer.engine.dataset import DatasetWriter, read_metadata
from synfer.engine.pipeline import run_recipe
from synfer.engine.recipe import load_recipe
from synfer.engine.resume import RECIPE_FILE, ResumeMismatch, changed_keys


def _recipe(tmp_path, registry, overrides=()):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"seed": 3, "num_images": 6, "output": str(tmp_path / "out"),
                                 "generator": {"plugin": "dummy", "batch_size": 4}, "experts": [{"plugin": "dummy-expert"}],
                                 "grid": False, "report": False}))  # (no matplotlib: these tests are about recipe.json)
    return load_recipe(p, overrides, registry=registry)


def test_first_run_writes_the_resolved_recipe(tmp_path, registry):
    run_recipe(_recipe(tmp_path, registry), registry=registry, progress=False)
    saved = json.loads((tmp_path / "out" / RECIPE_FILE).read_text())
    assert saved["seed"] == 3 and "output" not in saved
    assert saved["generator"]["plugin"] == "dummy" and "steps" in saved["generator"]  # plugin defaults filled in
    assert saved["experts"][0]["weight"] == 1.0 and saved["experts"][0]["plugin"] == "dummy-expert"


def test_changed_seed_stops_and_names_the_key(tmp_path, registry):
    run_recipe(_recipe(tmp_path, registry), registry=registry, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "images").iterdir()}
    with pytest.raises(ResumeMismatch) as exc:
        run_recipe(_recipe(tmp_path, registry, ["seed=4", "generator.steps=7"]), registry=registry, progress=False)
    msg = str(exc.value)
    assert "seed (3 -> 4)" in msg and "generator.steps (" in msg and "--force" in msg, msg
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "images").iterdir()} == before  # nothing written
    # --force continues, and records the new recipe
    run_recipe(_recipe(tmp_path, registry, ["seed=4", "generator.steps=7", "num_images=8"]), registry=registry, progress=False, force=True)
    assert json.loads((tmp_path / "out" / RECIPE_FILE).read_text())["seed"] == 4
    assert len(read_metadata(tmp_path / "out")) == 8


def test_growing_the_run_or_changing_evaluators_does_not_block(tmp_path, registry):
    run_recipe(_recipe(tmp_path, registry), registry=registry, progress=False)
    s = run_recipe(_recipe(tmp_path, registry, ["num_images=9", "generator.batch_size=2", "grid=true", "evaluators=[]"]),
                   registry=registry, progress=False)
    assert (s.resumed, s.generated) == (6, 3)
    assert json.loads((tmp_path / "out" / RECIPE_FILE).read_text())["num_images"] == 9



def test_a_setting_added_by_a_later_synfer_does_not_block_at_its_default(tmp_path, registry):
    """A folder started before a Config field existed (its recipe.json lacks the key) resumes when the
    new recipe leaves the field at its default; setting it explicitly is still a change."""
    run_recipe(_recipe(tmp_path, registry), registry=registry, progress=False)
    path = tmp_path / "out" / RECIPE_FILE
    saved = json.loads(path.read_text())
    assert "steps" in saved["generator"]
    del saved["generator"]["steps"]  # as written by a synfer that had no generator.steps yet
    path.write_text(json.dumps(saved))
    s = run_recipe(_recipe(tmp_path, registry, ["num_images=8"]), registry=registry, progress=False)
    assert (s.resumed, s.generated) == (6, 2)
    path.write_text(json.dumps(saved))
    with pytest.raises(ResumeMismatch, match=r"generator.steps \('<unset>' -> 7\)"):
        run_recipe(_recipe(tmp_path, registry, ["num_images=9", "generator.steps=7"]), registry=registry, progress=False)

def test_a_labelled_folder_is_not_a_run_output(tmp_path, registry):
    from PIL import Image

    w = DatasetWriter(tmp_path / "out")
    w.write(0, Image.new("RGB", (8, 8)), {"expression": "happy", "label": 1})
    with pytest.raises(ResumeMismatch, match="labelled images .* not the output of 'synfer run'"):
        run_recipe(_recipe(tmp_path, registry), registry=registry, progress=False)
    assert len(read_metadata(tmp_path / "out")) == 1 and not (tmp_path / "out" / RECIPE_FILE).exists()


def test_changed_keys_ignores_free_keys():
    old = {"seed": 1, "num_images": 5, "evaluators": [{"plugin": "fid"}], "generator": {"plugin": "sd", "steps": 5, "batch_size": 4},
           "experts": [{"plugin": "a"}]}
    new = {"seed": 1, "num_images": 50, "evaluators": [], "generator": {"plugin": "sd", "steps": 5, "batch_size": 8},
           "experts": [{"plugin": "a"}, {"plugin": "b"}]}
    assert [k for k, _, _ in changed_keys(old, new)] == ["experts.1.plugin", "experts.length"]


def test_cli_run_with_another_seed_exits_1_naming_seed(tmp_path, registry, monkeypatch):
    from synfer.engine import registry as plugins
    from synfer.commands.cli import main

    monkeypatch.setattr(plugins, "_REGISTRY", registry)  # the installed plugins plus the dummy stages
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"seed": 3, "num_images": 2, "output": str(tmp_path / "out"), "generator": {"plugin": "dummy"},
                                      "report": False, "grid": False}))
    runner = CliRunner()
    first = runner.invoke(main, ["run", str(recipe)])
    second = runner.invoke(main, ["run", str(recipe), "seed=5"])
    forced = runner.invoke(main, ["run", str(recipe), "seed=5", "--force"])
    assert first.exit_code == 0, first.output
    assert second.exit_code == 1 and "seed (3 -> 5)" in second.output, second.output
    checked = runner.invoke(main, ["validate", str(recipe), "seed=7"])  # validate says it before a run does (--force recorded 5)
    assert checked.exit_code == 1 and "seed (5 -> 7)" in checked.output, checked.output
    assert runner.invoke(main, ["validate", str(recipe), "seed=5", "num_images=4"]).exit_code == 0
    assert forced.exit_code == 0 and json.loads((tmp_path / "out" / RECIPE_FILE).read_text())["seed"] == 5, forced.output


def test_expert_align_is_the_ensembles_key_in_the_resolved_recipe(tmp_path, registry):
    """An expert block's `align` (the core's face alignment, like `weight`) is recorded beside the plugin's Config, never
    passed to it: the shipped sd15 recipe sets align: true on every expert, and resolving it once failed with
    'align: Extra inputs are not permitted' after validate had said ok."""
    from synfer.engine.resume import resolved_recipe

    recipe = _recipe(tmp_path, registry, ["experts=[{plugin: dummy-expert, weight: 0.5, align: true}]"])
    saved = resolved_recipe(recipe, registry)
    assert saved["experts"][0]["align"] is True and saved["experts"][0]["weight"] == 0.5
    assert saved["experts"][0]["plugin"] == "dummy-expert"
