"""Issue 20's table: each fault of a third-party plugin (tests/fault_plugins/) loaded beside the built-ins
and the example plugin ends in one clear error naming the plugin, or a recorded, documented behaviour."""
import json
import subprocess
import sys
import warnings

import pytest
import yaml
from PIL import Image

from conftest import HERE, make_dist, subprocess_env
from synfer import labels as L
from synfer.contract.contracts import PluginCallError, PluginContractError
from synfer.contract.guidance_contract import GuardedClassifier, guidance_targets
from synfer.engine.ensemble import ExpertEnsemble, Member
from synfer.engine.registry import PluginError, Registry
from synfer.engine.recipe import RecipeError, VoteConfig, validate_data
from synfer.stages import GeneratedSample, LabelledSample, SampleRequest

ROOT = HERE.parent
SYNFER = [sys.executable, "-m", "synfer"]
QUICKSTART = ["recipes/quickstart.yaml", "generator.layout.source=tests", "evaluators.4.reference=tests"]  # inputs make demo builds
# distribution -> module; one distribution per fault, so each costs only itself
FAULTS = {
    "acme-typo": "fault_plugins.typo_hook",
    "acme": "fault_plugins.clash_guidance",
    "acme-experts": "fault_plugins.clash_expert",
    "acme-shapes": "fault_plugins.wrong_shapes",
    "acme-loose": "fault_plugins.basemodel_config",
    "acme-ck": "fault_plugins.unknown_space",
    "acme-lazy": "fault_plugins.missing_predict",
    "acme-declared": "fault_plugins.declared_space",
    "acme-commands": "fault_plugins.commands",
    "acme-broken-commands": "fault_plugins.commands:broken",
    # issue 40's table (tests/test_isolation.py)
    "acme-exit-import": "fault_plugins.exit_at_import",
    "acme-interrupt-import": "fault_plugins.interrupt_at_import",
    "acme-exit-hook": "fault_plugins.exit_in_hook",
    "acme-chatty": "fault_plugins.print_at_import",
    "acme-slow": "fault_plugins.slow_import",
    "acme-reserved": "fault_plugins.reserved_config",
    "acme-clash-commands": "fault_plugins.commands_clash",
    "acme-stages": "fault_plugins.stage_faults",
    "acme-metrics": "fault_plugins.evaluator_results",
}
LEFT_OUT = {  # entry point -> what its one warning says
    "acme-typo": "implements unknown hook(s) register_stage",
    "acme-loose": "has a Config that is not a synfer.stages.StageConfig",
    "acme-ck": "declares label_space 'ckplus7', which is unknown",
    "acme-lazy": "does not implement predict, required of every expert",
    "acme-exit-import": "failed to import: called sys.exit(3); a plugin raises an exception and never exits synfer",
    "acme-interrupt-import": "failed to import: raised KeyboardInterrupt without a Ctrl-C",
    "acme-exit-hook": "was left out: plugin acme-exit-hook failed in register_stages(): called sys.exit(2)",
    "acme-reserved": "declares Config field(s) 'weight', 'align', which the core reads from the same recipe block "
                     "(reserved in expert blocks: plugin, weight, align)",
}


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-dists")
    for dist, module in FAULTS.items():
        make_dist(root / dist, dist, {dist: module})
    return [root / d for d in FAULTS]


@pytest.fixture(scope="module")
def faulty(dists):
    """A registry loaded with every fault plugin beside the built-ins and the example; the warnings it gave."""
    sys.path[:0] = [str(d) for d in dists]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reg = Registry()
            reg.load_entrypoints()
    finally:
        del sys.path[:len(dists)]
    yield reg, [w for w in caught if str(w.message).startswith("synfer plugin ")]
    for name in reg.spaces:  # plugin-declared label spaces are process-wide: leave none behind
        L.LABEL_SPACES.pop(name, None)


def test_builtins_and_example_survive_every_fault(faulty):
    reg, _ = faulty
    shipped = {(k, n) for k, ns in yaml.safe_load((ROOT / "registry.yaml").read_text())["builtin"].items() for n in ns}
    assert {(p.kind, p.name) for p in reg.entries if p.builtin} == shipped
    assert reg.get("guidance_classifier", "oracle-cnn").__module__ == "synfer_plugins.tiny_cnn"
    assert reg.get("au_detector", "au-cnn").__module__ == "synfer_plugins.tiny_cnn"
    assert reg.get("guidance_classifier", "example-smile").__module__ == "synfer_example"


def test_each_bad_plugin_is_left_out_alone_with_one_warning(faulty):
    reg, caught = faulty
    assert {n for n, _ in reg.failures} == set(LEFT_OUT)
    for name, what in LEFT_OUT.items():
        msgs = [str(w.message) for w in caught if f"synfer plugin {name!r}" in str(w.message)]
        assert len(msgs) == 1 and what in msgs[0], (name, msgs)
    assert len(caught) == len(LEFT_OUT)
    # what a recipe naming a left-out plugin is told
    with pytest.raises(PluginError, match=r"no expert named 'fault-nopredict'\. Its plugin was left out: acme-lazy: .*does not implement predict"):
        reg.get("expert", "fault-nopredict")


def test_a_name_clash_names_both_and_the_recipe_picks_one(faulty):
    reg, _ = faulty
    with pytest.raises(PluginError, match=r"2 plugins answer to guidance_classifier 'tiny-cnn': guidance_classifier 'tiny-cnn' "
                                          r"\(from synfer, built-in\) and guidance_classifier 'tiny-cnn' \(from acme\)\. .*"
                                          r"`plugin: synfer:tiny-cnn` or `plugin: acme:tiny-cnn`"):
        reg.get("guidance_classifier", "tiny-cnn")
    assert reg.get("guidance_classifier", "synfer:tiny-cnn").__name__ == "TinyCNN"
    assert reg.get("guidance_classifier", "acme:tiny-cnn").__name__ == "AcmeTiny"
    # across kinds: an expert named like a built-in guidance classifier clashes where both vote
    with pytest.raises(PluginError, match=r"3 plugins answer to expert 'tiny-cnn': guidance_classifier 'tiny-cnn' \(from synfer, built-in\), "
                                          r"guidance_classifier 'tiny-cnn' \(from acme\) and expert 'tiny-cnn' \(from acme-experts\)"):
        reg.get("expert", "tiny-cnn")
    assert reg.get("expert", "synfer:tiny-cnn").__name__ == "TinyCNN"
    assert reg.get("expert", "acme-experts:tiny-cnn").__name__ == "AcmeTinyExpert"


def test_recipe_validation_reports_the_clash_and_accepts_the_qualified_name(faulty):
    reg, _ = faulty
    data = {"generator": {"plugin": "sd"}, "guidance_classifier": {"plugin": "tiny-cnn"}, "experts": [{"plugin": "tiny-cnn"}]}
    with pytest.raises(RecipeError) as err:
        validate_data(data, reg)
    assert "guidance_classifier.plugin: 2 plugins answer to guidance_classifier 'tiny-cnn'" in str(err.value)
    assert "experts.0.plugin: 3 plugins answer to expert 'tiny-cnn'" in str(err.value)
    ok = validate_data({**data, "guidance_classifier": {"plugin": "synfer:tiny-cnn"}, "experts": [{"plugin": "synfer:tiny-cnn"}]}, reg)
    assert ok.guidance_classifier == {"plugin": "synfer:tiny-cnn"}


def _samples(n):
    return [GeneratedSample(SampleRequest(i, i, "happy", {}), Image.new("RGB", (8, 8))) for i in range(n)]


def _vote(reg, name, n=8):
    e = reg.build("expert", {"plugin": name})
    m = Member(name, 1.0, e.label_space, lambda s, e=e: e.predict([x.image for x in s]), e, e.outputs)
    return ExpertEnsemble([m], "affectnet8", VoteConfig())(_samples(n), ["sad"] * n)


@pytest.mark.parametrize("name, message", [
    ("fault-nan", r"expert 'fault-nan' \(from acme-shapes\) returned non-finite values \(NaN or inf\) for 1 of 8 image\(s\); expected finite probabilities"),
    ("fault-logprob", r"expert 'fault-logprob' \(from acme-shapes\) returned negative values \(min -3.91; log-probabilities or logits\?\); "
                      r"expected probabilities .* sets `outputs = \"logits\"`"),
    ("fault-transposed", r"expert 'fault-transposed' \(from acme-shapes\) returned rows summing to 0.16..6.88 whose columns sum to 1 "
                         r"\(a transposed \(classes, N\) array\?\)"),
])
def test_expert_outputs_are_checked(faulty, name, message):
    with pytest.raises(PluginContractError, match=message):
        _vote(faulty[0], name)


def test_transposed_expert_at_another_batch_size_and_declared_logits(faulty):
    with pytest.raises(PluginContractError, match=r"returned shape \(8, 3\) for 3 image\(s\); expected \(3, 8\).*\(transposed\?"):
        _vote(faulty[0], "fault-transposed", n=3)
    votes = _vote(faulty[0], "fault-declared-logits", n=2)  # documented: logits declared, the core applies the softmax
    soft = votes[0][1]["fault-declared-logits"]
    assert abs(soft.sum() - 1) < 1e-9 and int(soft.argmax()) == 1 and soft[1] == pytest.approx(0.86)


def _forward(reg, name, n=4):
    import torch

    clf = GuardedClassifier(reg.build("guidance_classifier", {"plugin": name}))
    x = torch.rand(n, 3, 8, 8, requires_grad=True)
    return clf.forward(x * 2 - 1)


@pytest.mark.parametrize("name, error, message", [
    ("fault-probs", PluginContractError, r"guidance_classifier 'fault-probs' \(from acme-shapes\) returned probabilities from forward\(\)"),
    ("fault-7of8", PluginContractError, r"'fault-7of8' \(from acme-shapes\) returned logits of shape \(4, 7\) for 4 image\(s\); expected \(4, 8\)"),
    ("fault-detached", PluginContractError, r"'fault-detached' \(from acme-shapes\) returned logits that carry no gradient"),
    ("fault-fer2013", PluginContractError, r"'fault-fer2013' \(from acme-shapes\) changed its label_space from affectnet8 to fer2013"),
    ("fault-raises", PluginCallError, r"^guidance_classifier 'fault-raises' \(from acme-shapes\) failed in forward\(\): RuntimeError: mat1 and mat2"),
])
def test_guidance_outputs_are_checked(faulty, name, error, message):
    with pytest.raises(error, match=message) as err:
        _forward(faulty[0], name)
    assert "\n" not in str(err.value)


def test_good_guidance_classifiers_pass_the_checks(faulty):
    for name in ("example-smile", "synfer:tiny-cnn", "fault-7class"):
        out = _forward(faulty[0], name)
        assert out.requires_grad and out.shape[0] == 4


def test_classes_the_guidance_classifier_cannot_see_are_recorded_unguided(faulty):
    clf = GuardedClassifier(faulty[0].build("guidance_classifier", {"plugin": "fault-7class"}))
    reqs = [SampleRequest(0, 0, "contempt", {}), SampleRequest(1, 1, "happy", {})]
    targets, mask = guidance_targets(clf, reqs)
    assert mask == [False, True] and targets[1] == L.label_space("fer2013").index("happy")
    rows = [LabelledSample(GeneratedSample(r, Image.new("RGB", (4, 4))), r.expression, r.expression, [1.0], 1.0, True).metadata("x.png")
            for r in reqs]
    assert rows[0]["guided"] is False and "guided" not in rows[1]  # guided samples keep the rows they always had


def test_a_plugin_declared_label_space_votes(faulty):
    reg, _ = faulty
    assert L.label_space("ckplus6") == ("anger", "disgust", "fear", "happy", "sad", "surprise") and reg.spaces == {"ckplus6": "acme-declared"}
    votes = _vote(reg, "fault-ck-declared", n=2)
    p = votes[0][1]["fault-ck-declared"]
    assert int(p.argmax()) == L.label_space("affectnet8").index("anger") and p[L.label_space("affectnet8").index("neutral")] == 0


@pytest.mark.slow  # subprocesses or a diffusion run
def test_cli_beside_the_faults(dists, tmp_path):
    env = subprocess_env(HERE, *dists)
    quickstart = [*QUICKSTART, f"output={tmp_path / 'out'}"]  # never the repo's out/quickstart, which make demo wrote
    out = subprocess.run(SYNFER + ["plugins", "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {f["entry_point"] for f in data["failed"]} == set(LEFT_OUT)
    assert {r["name"] for r in data["plugins"] if r["clash"]} == {"tiny-cnn"}
    bad = subprocess.run(SYNFER + ["validate", *quickstart], capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode != 0 and "2 plugins answer to guidance_classifier 'tiny-cnn'" in bad.stderr
    assert "Traceback" not in bad.stderr
    for name in LEFT_OUT:  # each left-out plugin warned about once, in one line
        assert bad.stderr.count(f"warning: synfer plugin {name!r}") == 1, bad.stderr
    ok = subprocess.run(SYNFER + ["-p", "no:acme", "-p", "no:acme-experts", "validate", *quickstart],
                        capture_output=True, text=True, env=env, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    env["SYNFER_PLUGINS"] = "acme-declared"  # only this third party (and the built-ins)
    only = json.loads(subprocess.run(SYNFER + ["plugins", "--json"], capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout)
    assert only["failed"] == [] and {r["provider"] for r in only["plugins"]} == {"synfer", "acme-declared"}
    assert len(only["skipped"]) == len(FAULTS) - 1 + 1  # the other faults and the example plugin


@pytest.mark.slow  # subprocesses or a diffusion run
def test_a_run_records_which_samples_a_7_class_classifier_could_not_guide(faulty, tmp_path):
    """End to end on a tiny generator: contempt (outside fer2013) is written `guided: false`."""
    pytest.importorskip("torch")
    from synfer.engine.dataset import read_metadata
    from synfer.engine.pipeline import run_recipe
    from test_generator import tiny

    reg, _ = faulty
    tiny().save_pretrained(tmp_path / "model")
    recipe = validate_data({"num_images": 4, "expressions": ["happy", "contempt"], "output": str(tmp_path / "out"), "grid": False, "report": False,
                            "generator": {"plugin": "sd", "model": str(tmp_path / "model"), "steps": 2, "batch_size": 4,
                                          "semantic_guidance": {"start": 0.0}},
                            "guidance_classifier": {"plugin": "fault-7class"}}, reg)
    run_recipe(recipe, registry=reg, progress=False)
    rows = read_metadata(tmp_path / "out")
    assert {r["preassigned_label"] for r in rows} == {"happy", "contempt"}
    for r in rows:
        assert r["semantic_guidance"]["classifier"] == "fault-7class"
        assert r.get("guided", True) is (r["preassigned_label"] != "contempt"), r


@pytest.mark.slow  # subprocesses or a diffusion run
def test_plugins_own_their_commands_and_a_failing_hook_costs_only_its_own(dists):
    env = subprocess_env(HERE, *dists)
    out = subprocess.run(SYNFER + ["-p", "no:acme", "-p", "no:acme-experts", "train", "acme-model"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and out.stdout == "trained\n", out.stderr
    assert out.stderr.count("could not add its commands") == 1
    assert "synfer plugin acme-broken-commands could not add its commands: KeyError: \"synfer has no command group 'no-such-group'" in out.stderr
    helps = subprocess.run(SYNFER + ["train", "--help"], capture_output=True, text=True, env=env, cwd=ROOT).stdout
    assert all(c in helps for c in ("acme-model", "classifier", "au-detector")), helps
    assert subprocess.run(SYNFER + ["acme-hello"], capture_output=True, text=True, env=env, cwd=ROOT).stdout == "hello from acme-commands\n"


def test_tiny_cnn_trained_on_fer2013_guides_in_fer2013(faulty, tmp_path):
    """The fixed pattern: label_space is read from the weights' config.json before any weight loads."""
    torch = pytest.importorskip("torch")
    from synfer_plugins.tiny_cnn import build_net, save_net

    save_net(build_net(7, width=8, size=16), tmp_path, {"num_outputs": 7, "width": 8, "size": 16, "label_space": "fer2013"})
    clf = faulty[0].build("guidance_classifier", {"plugin": "synfer:tiny-cnn", "weights": str(tmp_path)})
    guarded = GuardedClassifier(clf)
    assert guarded.label_space == "fer2013" and getattr(clf, "_net", None) is None  # known, nothing loaded
    targets, mask = guidance_targets(guarded, [SampleRequest(0, 0, "happy", {}), SampleRequest(1, 1, "neutral", {})])
    assert targets == [3, 6] and mask == [True, True]
    assert guarded.forward(torch.zeros(2, 3, 16, 16, requires_grad=True)).shape == (2, 7)


def test_hooks_without_the_marker_or_none_at_all_are_errors():
    mod = type(sys)("unmarked")
    mod.register_stages = lambda register: None  # @synfer.hookimpl forgotten: pluggy would never call it
    with pytest.raises(PluginError, match="defines register_stages without the @synfer.hookimpl marker"):
        Registry().add(mod, provider="acme-unmarked")
    with pytest.raises(PluginError, match="implements none of synfer's hooks"):
        Registry().add(type(sys)("empty"), provider="acme-empty")


def test_errors_inside_any_stage_name_it_in_one_line(registry, tmp_path):
    """The generator, prompter and evaluators are called through synfer.contract.contracts.Guarded by the pipeline."""
    from synfer.engine.pipeline import run_recipe

    recipe = validate_data({"num_images": 2, "output": str(tmp_path / "o"), "grid": False, "report": False,
                            "generator": {"plugin": "dummy", "steps": 0}}, registry)
    with pytest.raises(PluginCallError, match=r"^generator 'dummy' \(from tests\) failed in generate\(\): ValueError: steps must be > 0$"):
        run_recipe(recipe, registry=registry, progress=False)
