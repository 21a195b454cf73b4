"""`synfer validate` catches what `synfer run` would hit (issue 22, item 3): one case per row,
each a recipe error that names the key (or quotes the override) and says what was expected."""
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from synfer.engine.recipe import MAX_IMAGES, RecipeError, apply_overrides, load_recipe, validate_data

ROOT = Path(__file__).parent.parent
QUICKSTART = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())


@pytest.fixture
def paths(tmp_path):
    """The quickstart's input folders, made to exist (fetext, fid reference) in tmp_path."""
    for name in ("fetext", "ref"):
        (tmp_path / name).mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path


def base_overrides(p: Path) -> list[str]:
    return [f"output={p / 'out'}", f"generator.layout.source={p / 'fetext'}", f"evaluators.4.reference={p / 'ref'}"]


def problems_of(p: Path, *overrides: str) -> list[str]:
    errors: list[str] = []
    data = apply_overrides(QUICKSTART, base_overrides(p) + list(overrides), errors)
    try:
        validate_data(data, problems=errors)
    except RecipeError as exc:
        return exc.problems
    return []


def test_the_base_recipe_is_valid(paths):
    assert problems_of(paths) == []


# (overrides, the problem line must start with, and contain)
BAD_VALUES = [
    (["seed=-1"], "seed:", "greater than or equal to 0"),
    (["au_prior.low=0.9", "au_prior.high=0.5"], "au_prior:", "low (0.9) is above high (0.5)"),
    (["expressions={happy: 0}"], "expressions:", "sum to 0"),
    (["expressions={happy: 0, sad: 0}"], "expressions:", "sum to 0"),
    (["expressions={happy: -1, sad: 2}"], "expressions:", "finite numbers >= 0"),
    (["expressions=[]"], "expressions:", "empty"),
    (["expressions=[happy, smug]"], "expressions:", "unknown expression 'smug'"),
    ([f"num_images={MAX_IMAGES + 1}"], "num_images:", f"less than or equal to {MAX_IMAGES}"),
    (["num_images=1000000000000"], "num_images:", "less than or equal to"),
    (["output={p}/a-file"], "output:", "this is a file; expected a folder"),
    (["generator.layout.source={p}/missing"], "generator.layout.source:", "does not exist"),
    (["evaluators.4.reference={p}/missing"], "evaluators.4.reference:", "does not exist"),
]


@pytest.mark.parametrize("overrides,key,text", BAD_VALUES, ids=[" ".join(c[0]) for c in BAD_VALUES])
def test_bad_values_are_recipe_errors(paths, overrides, key, text):
    found = problems_of(paths, *[o.replace("{p}", str(paths)) for o in overrides])
    assert len(found) == 1, found
    assert found[0].startswith(key) and text in found[0], found[0]


BAD_OVERRIDES = [
    ("experts.5.weight=2", "experts has items 0..0, so there is no item 5"),
    ("experts.x.weight=2", "experts is a list: expected an item number (0..0), got 'x'"),
    ("experts.-1.weight=2", "experts has items 0..0, so there is no item -1"),
    ("num_images=[1", "the value '[1' is not valid YAML"),
    ("=3", "the key has an empty part"),
    ("generator..steps=3", "the key has an empty part"),
    ("steps", "expected key=value"),
]


@pytest.mark.parametrize("item,text", BAD_OVERRIDES, ids=[c[0] for c in BAD_OVERRIDES])
def test_override_syntax_errors_quote_the_override(paths, item, text):
    with pytest.raises(RecipeError) as exc:
        apply_overrides(QUICKSTART, [item])
    assert len(exc.value.problems) == 1, exc.value.problems
    assert exc.value.problems[0].startswith(f"override {item!r}: ") and text in exc.value.problems[0], exc.value.problems
    found = problems_of(paths, item)  # collected: the other overrides and the recipe are still checked
    assert len(found) == 1 and found[0].startswith(f"override {item!r}: ") and text in found[0], found


def test_validate_lists_every_problem_at_once(paths, tmp_path):
    from synfer.commands.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(QUICKSTART))
    args = ["validate", str(recipe), *base_overrides(paths), "seed=-1", "au_prior.low=0.9", "au_prior.high=0.5",
            "expressions={happy: 0}", "experts.5.weight=2", "num_images=[1", f"evaluators.4.reference={paths / 'missing'}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "has 6 problem(s)" in result.output, result.output
    for part in ("seed:", "au_prior:", "expressions:", "'experts.5.weight=2'", "'num_images=[1'", "evaluators.4.reference:"):
        assert part in result.output, part
    # the same recipe without the bad keys passes
    ok = CliRunner().invoke(main, ["validate", str(recipe), *base_overrides(paths)])
    assert ok.exit_code == 0 and ": ok (64 images" in ok.output, ok.output


def test_fetext_and_benchmark_recipes_share_the_checks(tmp_path):
    from synfer.commands.downstream import load_config
    from synfer.commands.fetext import load_fetext_recipe

    (tmp_path / "file").write_text("x")
    with pytest.raises(RecipeError) as exc:
        load_fetext_recipe(ROOT / "recipes" / "fetext-procedural.yaml", ["seed=-2", "label_space=nope", f"output={tmp_path / 'file'}",
                                                                         "sources.3.seed=1"])
    lines = exc.value.problems
    assert [line.split(":")[0] for line in lines] == ["override 'sources.3.seed=1'", "output", "label_space", "seed"], lines
    with pytest.raises(RecipeError) as exc:
        load_config(ROOT / "recipes" / "downstream.yaml", ["label_space=nope", "seeds.x=1"])
    assert [line.split(":")[0] for line in exc.value.problems] == ["override 'seeds.x=1'", "label_space"], exc.value.problems


def test_a_run_recipe_loads_with_overrides(paths):
    r = load_recipe(ROOT / "recipes" / "quickstart.yaml", base_overrides(paths) + ["experts.0.weight=2", "expressions={happy: 3, sad: 1}"])
    assert r.experts[0]["weight"] == 2 and r.mix() == {"happy": 0.75, "sad": 0.25}
    assert QUICKSTART["experts"][0]["weight"] == 1.0  # overrides never touch the parsed file


def test_validate_checks_every_file_the_sd15_recipe_references(tmp_path, monkeypatch):
    """Every file `run` would load is checked first, each with the command that makes or fetches it: the judge (a
    nested block), fetchable expert / detector weights not fetched yet, the calibrator, the generator."""
    monkeypatch.setenv("SYNFER_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RecipeError) as exc:
        load_recipe(ROOT / "recipes" / "sd15-affectnet8.yaml", [f"output={tmp_path / 'out'}"])
    lines = exc.value.problems
    text = "\n".join(lines)
    assert "evaluators.0.judge.weights: 'models/judge' does not exist" in text and "synfer train classifier" in text
    for name in ("fer-minixception", "big-xception"):
        assert f"{name} is not fetched yet" in text and f"synfer models fetch {name}" in text
    assert "experts.0.align" not in text or "synfer models fetch retinaface" in text
    assert "guidance_classifier.weights: fer-minixception is not fetched yet" in text
    assert any(line.startswith("calibrator.weights:") and "synfer train calibrator" in line for line in lines)
    # a fetched copy at a path that is not there is named too
    with pytest.raises(RecipeError, match="experts.1.weights: '/nowhere/x.h5' does not exist"):
        load_recipe(ROOT / "recipes" / "sd15-affectnet8.yaml", [f"output={tmp_path / 'out'}", "experts.1.weights=/nowhere/x.h5"])


def test_validate_checks_an_inception_extractor_and_the_judges(paths):
    got = problems_of(paths, "evaluators.4.extractor=inception", "evaluators.0.judge=no-such-judge", "evaluators.1.judge=tiny-cnn")
    assert any(p.startswith("evaluators.4.extractor_path: the inception extractor needs a local Inception-v3 file") for p in got), got
    assert any(p.startswith("evaluators.0.judge.plugin: no guidance_classifier named 'no-such-judge'") for p in got), got
    assert any(p.startswith("evaluators.1.judge.plugin: no au_detector named 'tiny-cnn'") for p in got), got


def test_a_plugin_exiting_in_its_problems_is_a_validation_line(registry):
    """A plugin's Config validators and problems() are plugin code: sys.exit() there is a line naming it, not an exit."""
    import sys
    import types

    from synfer import hookimpl
    from synfer.stages import Expert, StageConfig

    class Exits(Expert):
        name = "exits-in-problems"
        label_space = "fer2013"

        class Config(StageConfig):
            pass

        @classmethod
        def problems(cls, config):
            sys.exit(3)

        def predict(self, images):
            return None

    mod = types.ModuleType("exits_in_problems")
    mod.register_stages = hookimpl(lambda register: register(Exits))
    registry.add(mod, provider="acme")
    with pytest.raises(RecipeError) as exc:
        validate_data({"generator": {"plugin": "dummy"}, "experts": [{"plugin": "exits-in-problems"}]}, registry=registry)
    assert any(p.startswith("experts.0: expert 'exits-in-problems'") and "sys.exit(3)" in p for p in exc.value.problems), exc.value.problems
