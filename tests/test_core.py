"""Core: labels, plugins, recipes, CLI import hygiene."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import HERE, make_dist, subprocess_env

from synfer import labels as L
from synfer.engine.registry import PluginError, Registry
from synfer.engine.recipe import RecipeError, apply_overrides, load_recipe

ROOT = HERE.parent
SYNFER = [sys.executable, "-m", "synfer"]


def test_label_spaces_map_by_name():
    m = L.mapping_matrix("fer2013", "affectnet8")
    assert m.shape == (7, 8) and m.sum() == 7
    assert m[:, L.LABEL_SPACES["affectnet8"].index("contempt")].sum() == 0  # fer2013 cannot see contempt
    p = np.eye(7)[[L.LABEL_SPACES["fer2013"].index("anger")]]
    assert L.LABEL_SPACES["affectnet8"][int(L.convert_probs(p, "fer2013", "affectnet8").argmax())] == "anger"
    assert L.canonical("Angry") == "anger" and L.canonical("happiness") == "happy"
    with pytest.raises(ValueError, match="unknown expression"):
        L.canonical("bored")


def test_au_prior_deterministic_and_prototypical():
    assert len(L.AU_IDS) >= 16 and {1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26} <= set(L.AU_IDS)
    a, b = L.sample_aus("happy", 7), L.sample_aus("happy", 7)
    assert np.array_equal(a, b)
    on = {L.AU_IDS[i] for i in np.flatnonzero(a)}
    assert on == {6, 12}
    assert not L.sample_aus("neutral", 3).any()
    extra = L.AUPrior(extra_rate=0.5).sample("sad", np.random.default_rng(0))
    assert len(np.flatnonzero(extra)) > 3
    assert L.sample_seed(0, 1) != L.sample_seed(0, 2) and L.sample_seed(5, 9) == L.sample_seed(5, 9)


def test_fitted_au_prior_recovers_the_prior_that_drew_the_annotations(tmp_path):
    """`synfer labels --fit` (the distribution-alignment lever of issue 18): a set drawn from a known
    AUPrior gives back its four numbers, as a recipe block that validates."""
    from click.testing import CliRunner

    from synfer.commands.cli import main

    truth = L.AUPrior(low=0.3, high=0.9, extra_rate=0.1, extra_high=0.6)
    rng = np.random.default_rng(0)
    names = [L.EXPRESSIONS[i % 8] for i in range(4000)]
    vecs = [truth.sample(n, rng) for n in names]
    fit = L.fit_au_prior(vecs, names)
    assert abs(fit["low"] - 0.3) < 0.02 and abs(fit["high"] - 0.9) < 0.02, fit
    assert abs(fit["extra_rate"] - 0.1) < 0.005 and abs(fit["extra_high"] - 0.6) < 0.02, fit
    assert L.fit_au_prior(vecs, names) == fit  # no randomness in the fit

    (tmp_path / "images").mkdir()
    rows = [{"file_name": f"images/{i}.png", "index": i, "expression": n, "aus": L.au_dict(v)} for i, (n, v) in enumerate(zip(names, vecs))]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = CliRunner().invoke(main, ["labels", "--fit", str(tmp_path)])
    assert out.exit_code == 0, out.output
    block = yaml.safe_load(out.output)["au_prior"]
    assert block == pytest.approx(fit, abs=1e-4)
    from synfer.engine.recipe import AUPriorConfig

    prior = AUPriorConfig(**block)  # the block a recipe takes, and what the pipeline builds from it
    assert L.AUPrior(**prior.model_dump()) == L.AUPrior(**block)

    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "images/0.png", "index": 0, "label": "happy"}) + "\n")
    out = CliRunner().invoke(main, ["labels", "--fit", str(tmp_path)])
    assert out.exit_code != 0 and "no row has both `aus`" in out.output


def test_plugins_list_builtins_and_example(registry):
    assert registry.get("prompter", "template")
    assert registry.get("guidance_classifier", "example-smile")
    assert registry.get("expert", "example-constant")
    with pytest.raises(PluginError, match="Installed: .*Run 'synfer plugins'"):
        registry.get("guidance_classifier", "posterr")


def test_plugins_json_cli():
    out = subprocess.run(SYNFER + ["plugins", "--json"], capture_output=True, text=True, check=True, cwd=ROOT)
    rows = json.loads(out.stdout)["plugins"]
    providers = {(r["name"], r["provider"]) for r in rows}
    assert ("template", "synfer") in providers
    assert ("example-smile", "synfer-example-plugin") in providers


def test_broken_plugin_is_a_warning(tmp_path):
    (tmp_path / "synfer_broken.py").write_text("raise RuntimeError('boom at import')\n")
    make_dist(tmp_path, "synfer-broken", {"broken": "synfer_broken"})
    env = subprocess_env(tmp_path)
    out = subprocess.run(SYNFER + ["plugins"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "broken" in out.stderr and "boom at import" in out.stderr
    assert "template" in out.stdout  # the other plugins still load
    env["SYNFER_STRICT_PLUGINS"] = "1"
    strict = subprocess.run(SYNFER + ["plugins"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert strict.returncode != 0 and "boom at import" in strict.stderr
    env.pop("SYNFER_STRICT_PLUGINS")
    env["SYNFER_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    off = subprocess.run(SYNFER + ["plugins", "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert json.loads(off.stdout)["plugins"] == []


def test_duplicate_names_name_both_providers(registry):
    import dummy_plugins

    class Clash(dummy_plugins.DummyGenerator):
        pass

    mod = type(sys)("clash_mod")
    mod.register_stages = lambda register: register(Clash)
    from synfer.contract.hookspecs import hookimpl

    hookimpl(mod.register_stages)
    registry.add(mod, provider="clash-dist")  # both stay installed; a recipe names the one it means
    with pytest.raises(PluginError, match=r"2 plugins answer to generator 'dummy': generator 'dummy' \(from tests\) and "
                                          r"generator 'dummy' \(from clash-dist\).*`plugin: tests:dummy` or `plugin: clash-dist:dummy`"):
        registry.get("generator", "dummy")
    assert registry.get("generator", "clash-dist:dummy") is Clash
    assert registry.get("generator", "tests:dummy") is dummy_plugins.DummyGenerator
    twice = type(sys)("twice_mod")  # one provider cannot give two classes one name
    twice.register_stages = hookimpl(lambda register: (register(Clash), register(dummy_plugins.DummyGenerator)))
    with pytest.raises(PluginError, match="two generator plugins are named 'dummy'.*both from twice-dist; rename one"):
        registry.add(twice, provider="twice-dist")


def test_misspelled_hook_is_caught():
    from synfer.contract.hookspecs import hookimpl

    mod = type(sys)("typo_mod")

    @hookimpl
    def register_stage(register):  # missing the 's'
        pass

    mod.register_stage = register_stage
    with pytest.raises(Exception, match="register_stage"):
        Registry().add(mod)


def test_a_module_with_some_hooks_loads_under_a_strict_pluggy(monkeypatch):
    """pluggy 1.6 (seen on the GPU machine) reads a hook attribute without a default: a plugin module that
    implements register_stages alone must still load, not fail on the register_label_spaces it lacks."""
    import inspect

    import dummy_plugins

    def parse_hookimpl_opts(self, plugin, name):  # pluggy 1.6's, as it reads
        method = getattr(plugin, name)
        if not inspect.isroutine(method):
            return None
        res = getattr(method, self.project_name + "_impl", None)
        return res if isinstance(res, dict) else None

    reg = Registry()
    monkeypatch.setattr(type(reg.pm), "parse_hookimpl_opts", parse_hookimpl_opts)
    assert not hasattr(dummy_plugins, "register_label_spaces")
    reg.add(dummy_plugins, provider="tests")
    assert reg.get("generator", "tests:dummy") is dummy_plugins.DummyGenerator


def _recipe(tmp_path, data):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_recipe_with_three_mistakes_lists_all(tmp_path, registry):
    p = _recipe(tmp_path, {
        "num_images": 8,
        "generator": {"plugin": "dummy", "steps": "many"},
        "guidance_classifier": {"plugin": "posterr"},
        "experts": [{"plugin": "dummy-expert", "confuse_sadd": True}],
    })
    with pytest.raises(RecipeError) as err:
        load_recipe(p, registry=registry)
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "generator.steps" in msg and "guidance_classifier.plugin: no guidance_classifier named 'posterr'" in msg
    assert "experts.0.confuse_sadd: unknown key" in msg


def test_overrides(tmp_path, registry):
    p = _recipe(tmp_path, {"generator": {"plugin": "dummy"}, "experts": [{"plugin": "dummy-expert", "weight": 1}]})
    r = load_recipe(p, ["generator.steps=10", "num_images=16", "output=out/x", "experts.0.weight=2.5"], registry=registry)
    assert r.generator["steps"] == 10 and r.num_images == 16 and r.output == "out/x" and r.experts[0]["weight"] == 2.5
    with pytest.raises(RecipeError, match="expected key=value"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(RecipeError, match="num_images: Input should be greater than 0, got -3"):
        load_recipe(p, ["num_images=-3"], registry=registry)


def test_cli_import_does_not_load_torch():
    code = "import sys, synfer.commands.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import synfer.commands.cli"], capture_output=True, text=True, check=True)
    assert " torch" not in out.stderr


# quickstart's inputs (built by make demo) stand in as `tests/`: validate checks that they exist. OUTPUT is a fresh
# folder: validate compares with an existing output's recipe.json, and the repo's out/ is the demo's, not the suite's.
@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["validate", "recipes/quickstart.yaml", "generator.layout.source=tests",
                                                            "evaluators.4.reference=tests", "output=OUTPUT"], ["train", "--help"]])
def test_light_commands_do_not_import_torch(args, tmp_path):
    args = [a.replace("OUTPUT", str(tmp_path / "out")) for a in args]
    code = ("import sys, runpy; sys.argv=['synfer']+%r\n"
            "try:\n    runpy.run_module('synfer.commands.cli', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'" % (args,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_registry_yaml_matches_registered_plugins():
    reg = Registry()
    reg.load_entrypoints()
    data = yaml.safe_load((ROOT / "registry.yaml").read_text())
    from synfer.stages import STAGE_KINDS

    assert set(data["stages"]) == set(STAGE_KINDS)
    shipped = {(k, n) for k, ns in data["builtin"].items() for n in ns}
    builtin = {(p.kind, p.name) for p in reg.plugins.values() if p.provider == "synfer"}
    assert shipped == builtin, f"registry.yaml only: {shipped - builtin}; registered only: {builtin - shipped}"
    for name, path in data["presets"].items():
        assert (ROOT / path).exists(), name


def test_example_plugin_validates_in_recipe(tmp_path):
    p = _recipe(tmp_path, {"generator": {"plugin": "dummy"}, "guidance_classifier": {"plugin": "example-smile"},
                           "experts": [{"plugin": "example-constant", "weight": 0.5, "vote_for": "happy"}]})
    reg = Registry()
    reg.load_entrypoints()
    import dummy_plugins

    reg.add(dummy_plugins)
    r = load_recipe(p, registry=reg)
    assert r.experts[0]["vote_for"] == "happy"


def test_example_plugin_in_cli_validate(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"generator": {"plugin": "sd", "model": str(tmp_path)}, "guidance_classifier": {"plugin": "example-smile"},
                                 "experts": [{"plugin": "example-constant", "weight": 0.5}]}))
    out = subprocess.run(SYNFER + ["validate", str(p)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    bad = subprocess.run(SYNFER + ["validate", str(p), "experts.0.vote_for=bored"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "experts.0.vote_for" in bad.stderr


@pytest.mark.slow  # subprocess runs
def test_wheel_and_editable_install_include_builtin_plugins(tmp_path):
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("synfer_plugins")
    assert spec is not None and spec.submodule_search_locations  # the editable install maps plugins/ -> synfer_plugins
    assert Path(list(spec.submodule_search_locations)[0]).resolve() == (ROOT / "plugins").resolve()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr[-300:]}")
    names = zipfile.ZipFile(next(tmp_path.glob("synfer-*.whl"))).namelist()
    assert "synfer_plugins/procedural/__init__.py" in names and "synfer_plugins/procedural/face_parts.py" in names and "synfer/commands/cli.py" in names
    assert not any(n.startswith("plugins/") for n in names)  # never the bare, colliding name
    assert any(n.startswith("synfer_plugins/models/tiny-sd/unet/") for n in names) or not (ROOT / "plugins/models/tiny-sd").exists()
    assert not any("/work/" in n for n in names)  # training work dirs are not shipped
