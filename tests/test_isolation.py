"""Issue 40's table: plugin faults that once exited synfer, corrupted the dataset or silently changed a result.
Each is a plugin of tests/fault_plugins/ loaded beside the built-ins (test_faults.FAULTS); each now ends in one line
naming the plugin, or a documented behaviour. The evaluator-result rows (metrics.json) are issue 38's."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
from PIL import Image

import fault_plugins.stage_faults as stage_faults
from conftest import HERE, subprocess_env
from synfer.contract import isolation
from synfer.contract.contracts import RESERVED, Guarded, PluginCallError, PluginContractError
from synfer.contract.guidance_contract import GuardedClassifier
from synfer.engine.ensemble import ExpertEnsemble, Member
from synfer.engine.recipe import VoteConfig, validate_data
from synfer.stages import GeneratedSample, SampleRequest
from test_faults import FAULTS, ROOT, SYNFER, dists, faulty  # noqa: F401 - the module's fixtures

HAPPY = 1  # affectnet8 index


def _samples(n, seed=0):
    rng = np.random.default_rng(seed)
    return [GeneratedSample(SampleRequest(i, i, "happy", {}), Image.fromarray(rng.integers(0, 200, (32, 32, 3), dtype=np.uint8)))
            for i in range(n)]


def _member(reg, name):
    e = reg.build("expert", {"plugin": name})
    return Member(name, 1.0, e.label_space, lambda s, e=e: e.predict([x.image for x in s]), e, e.outputs)


def _vote(reg, *names, samples=None):
    samples = samples or _samples(4)
    return ExpertEnsemble([_member(reg, n) for n in names], "affectnet8", VoteConfig())(samples, ["happy"] * len(samples))


# ---------------------------------------------------------------- exit, Ctrl-C


@pytest.mark.parametrize("name, message", [
    ("fault-exit-predict", r"^expert 'fault-exit-predict' \(from acme-stages\) failed in predict\(\): called sys.exit\(None\); "
                           r"a plugin raises an exception and never exits synfer$"),
    ("fault-raise-interrupt", r"^expert 'fault-raise-interrupt' \(from acme-stages\) failed in predict\(\): raised KeyboardInterrupt "
                              r"without a Ctrl-C; a plugin raises an ordinary exception$"),
])
def test_exit_or_interrupt_raised_by_a_plugin_is_its_error(faulty, name, message):
    with pytest.raises(PluginCallError, match=message):
        _vote(faulty[0], name)


def test_exit_in_init_or_config_names_the_plugin(faulty):
    with pytest.raises(PluginCallError, match=r"^expert 'fault-exit-init' \(from acme-stages\) failed in __init__\(\): called sys.exit\(3\)"):
        faulty[0].build("expert", {"plugin": "fault-exit-init"})
    with pytest.raises(PluginCallError, match=r"^expert 'fault-exit-config' \(from acme-stages\) failed in Config\(\): called sys.exit\(4\)"):
        faulty[0].build("expert", {"plugin": "fault-exit-config"})


def test_a_real_ctrl_c_inside_a_plugin_still_stops_synfer(faulty):
    assert isolation._watching  # the registry installed the SIGINT counter: Python's default handler was in place
    stage_faults.CtrlC.calls, stage_faults.CtrlC.at = 0, 1
    with pytest.raises(KeyboardInterrupt):
        _vote(faulty[0], "fault-ctrl-c")
    assert isolation._sigints == 0  # matched to its KeyboardInterrupt: a plugin's own one later is still its error
    with pytest.raises(PluginCallError, match="raised KeyboardInterrupt without a Ctrl-C"):
        _vote(faulty[0], "fault-raise-interrupt")


def test_with_sigint_ignored_every_keyboard_interrupt_is_the_plugins(faulty, monkeypatch):
    """A process started in the background ignores SIGINT: no Ctrl-C can reach it, so a KeyboardInterrupt a plugin
    raises is its error, even where the SIGINT counter could not be installed."""
    import signal

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        monkeypatch.setattr(isolation, "_watching", False)
        with pytest.raises(PluginCallError, match="raised KeyboardInterrupt without a Ctrl-C"):
            _vote(faulty[0], "fault-raise-interrupt")
    finally:
        signal.signal(signal.SIGINT, old)


def _dummy_recipe(reg, out, experts=(), evaluators=(), n=6):
    return validate_data({"num_images": n, "output": str(out), "grid": False, "report": False, "generator": {"plugin": "dummy", "batch_size": 2, "size": 32},
                          "experts": [{"plugin": e} for e in experts], "evaluators": [{"plugin": e} for e in evaluators]}, reg)


def _files(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())}


def test_ctrl_c_in_a_plugin_stops_a_run_that_resumes_to_the_same_files(registry, tmp_path):
    from synfer.engine.dataset import METADATA
    from synfer.engine.pipeline import run_recipe

    registry.add(stage_faults, provider="acme-stages")
    stage_faults.CtrlC.calls, stage_faults.CtrlC.at = 0, 3  # Ctrl-C while the second batch is voted on (one call a sample)
    recipe = _dummy_recipe(registry, tmp_path / "cut", ["dummy-expert", "fault-ctrl-c"])
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, registry=registry, progress=False)
    assert len(_files(tmp_path / "cut")) == 2 and not (tmp_path / "cut" / ".synfer.lock").exists()
    stage_faults.CtrlC.at = 10**9
    s = run_recipe(recipe, registry=registry, progress=False)
    assert (s.generated, s.resumed) == (4, 2)
    run_recipe(_dummy_recipe(registry, tmp_path / "whole", ["dummy-expert", "fault-ctrl-c"]), registry=registry, progress=False)
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")
    assert (tmp_path / "cut" / METADATA).read_bytes() == (tmp_path / "whole" / METADATA).read_bytes()


# ---------------------------------------------------------------- shared data


def test_an_expert_editing_its_images_changes_neither_the_samples_nor_the_next_voter(faulty):
    reg, _ = faulty
    samples = _samples(4)
    before = [s.image.tobytes() for s in samples]
    seen = []
    record = Member("recorder", 1.0, "affectnet8", lambda s: seen.extend(x.image.tobytes() for x in s) or np.full((len(s), 8), 1 / 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ens = ExpertEnsemble([_member(reg, "fault-equalize"), record], "affectnet8", VoteConfig())
        ens(samples, ["happy"] * 4)
        ens(samples, ["happy"] * 4)
    assert [s.image.tobytes() for s in samples] == before and seen == before * 2
    msgs = [str(w.message) for w in caught if "fault-equalize" in str(w.message)]
    assert msgs == ["expert 'fault-equalize' (from acme-stages) changed 4 of the 4 image(s) it was given in predict(); it was handed "
                    "copies, so the dataset and the other voters are unaffected, but its votes judged its own edits. Copy an image "
                    "before changing it (image.copy())"]


def test_the_files_written_are_the_generated_ones_whatever_an_expert_does(registry, tmp_path, monkeypatch):
    from synfer.contract import contracts
    from synfer.engine.dataset import read_metadata
    from synfer.engine.pipeline import run_recipe

    registry.add(stage_faults, provider="acme-stages")
    monkeypatch.setattr(contracts, "_told_touched", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_recipe(_dummy_recipe(registry, tmp_path / "edited", ["fault-equalize", "dummy-expert"]), registry=registry, progress=False)
    assert sum("'fault-equalize' (from acme-stages) changed 1 of the 1 image(s)" in str(w.message) for w in caught) == 1  # it did edit
    run_recipe(_dummy_recipe(registry, tmp_path / "plain", ["dummy-expert"]), registry=registry, progress=False)
    assert _files(tmp_path / "edited") == _files(tmp_path / "plain")
    for a, b in zip(read_metadata(tmp_path / "edited"), read_metadata(tmp_path / "plain")):
        assert a["predictions"]["dummy-expert"] == b["predictions"]["dummy-expert"]  # the second voter saw the generated image


def test_an_evaluator_that_writes_into_the_dataset_is_named(registry, tmp_path):
    from synfer.engine.pipeline import run_recipe

    registry.add(stage_faults, provider="acme-stages")
    run_recipe(_dummy_recipe(registry, tmp_path / "o", n=2), registry=registry, progress=False)
    ev = Guarded(registry.build("evaluator", {"plugin": "fault-writes-dataset"}), "evaluate")
    with pytest.raises(PluginContractError, match=r"^evaluator 'fault-writes-dataset' \(from acme-stages\) changed the dataset it "
                                                  r"measured \(1 file\(s\): images/00000000\.png\); an evaluator reads"):
        ev.evaluate(tmp_path / "o")
    assert Guarded(registry.build("evaluator", {"plugin": "dummy-count"}), "evaluate").evaluate(tmp_path / "o") == {"count": 2.0}


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("name, message", [
    ("fault-softmaxed", r"^expert 'fault-softmaxed' \(from acme-stages\) declares outputs = \"logits\" but returned probabilities "
                        r"\(each row non-negative, summing to 1\); the core would apply the softmax a second time"),
    ("fault-meta-expert", r"^expert 'fault-meta-expert' \(from acme-stages\) returned a tensor on the meta device, which holds no values"),
])
def test_expert_outputs_of_issue_40_are_refused(faulty, name, message):
    with pytest.raises(PluginContractError, match=message):
        _vote(faulty[0], name)


def test_a_half_precision_tensor_with_a_gradient_is_converted(faulty):
    (v, preds), *_ = _vote(faulty[0], "fault-grad-tensor")
    p = preds["fault-grad-tensor"]
    assert int(p.argmax()) == HAPPY and p[HAPPY] == pytest.approx(0.972, abs=1e-3) and abs(p.sum() - 1) < 1e-6


def test_an_init_without_super_is_named(faulty):
    with pytest.raises(PluginContractError, match=r"^expert 'fault-no-super' \(from acme-stages\) has no `config` after __init__ "
                                                  r"\(an __init__ that does not call super\(\).__init__\(config\)\?\)"):
        faulty[0].build("expert", {"plugin": "fault-no-super"})


def _forward(reg, name, x=None):
    import torch

    clf = GuardedClassifier(reg.build("guidance_classifier", {"plugin": name}))
    x = (torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True) if x is None else x
    return clf.forward(x)


@pytest.mark.parametrize("name, message", [
    ("fault-nan-logits", r"^guidance_classifier 'fault-nan-logits' \(from acme-stages\) returned non-finite logits \(NaN or inf\) for "
                         r"4 of 4 image\(s\) whose pixels are finite"),
    ("fault-rounds", r"^guidance_classifier 'fault-rounds' \(from acme-stages\) has a zero gradient with respect to its input for all 4 "
                     r"image\(s\) on the first guided step \(rounding, argmax"),
    ("fault-meta-logits", r"^guidance_classifier 'fault-meta-logits' \(from acme-stages\) returned logits on the meta device"),
])
def test_guidance_outputs_of_issue_40_are_refused(faulty, name, message):
    with pytest.raises(PluginContractError, match=message) as err:
        _forward(faulty[0], name)
    assert "\n" not in str(err.value)


def test_guidance_checks_spare_what_is_not_the_classifiers_fault(faulty):
    torch = pytest.importorskip("torch")
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keep = x.clone()
    x.requires_grad_(True)
    out = _forward(faulty[0], "fault-inplace", x)  # it edits its input in place: its own copy
    assert torch.equal(x.detach(), keep) and out.shape == (4, 8)
    nan = torch.full((2, 3, 8, 8), float("nan"), requires_grad=True)  # a diverged sample: NaN in, NaN out is no contract breach
    assert torch.isnan(_forward(faulty[0], "fault-7class", nan)).all()
    blank = torch.zeros(2, 3, 8, 8, requires_grad=True)  # no slope on a blank image is no proof of a broken classifier
    assert _forward(faulty[0], "fault-rounds", blank).shape == (2, 8)


def test_guidance_errors_name_the_real_samples_of_a_padded_chunk(faulty):
    torch = pytest.importorskip("torch")

    class Padding:  # a generator that pads 2 requests to a chunk of 4 before guidance sees them
        kind, name = "generator", "padding"

        def generate(self, requests, guidance=None):
            guidance.forward(torch.rand(4, 3, 8, 8, requires_grad=True))

    clf = GuardedClassifier(faulty[0].build("guidance_classifier", {"plugin": "fault-7of8"}))
    with pytest.raises(PluginContractError, match=r"returned logits of shape \(4, 7\) for 4 image\(s\) \(a chunk the generator padded "
                                                  r"to 4 slots; the run's samples in it: 5, 6\); expected \(4, 8\)"):
        Guarded(Padding(), "generate").generate([SampleRequest(5, 5, "happy", {}), SampleRequest(6, 6, "sad", {})], guidance=clf)
    assert clf._real is None


@pytest.mark.slow  # a diffusion run
def test_a_classifier_without_gradient_stops_a_guided_run_before_a_row_claims_guidance(faulty, tmp_path):
    pytest.importorskip("torch")
    from synfer.engine.dataset import collect_rows
    from synfer.engine.pipeline import run_recipe
    from test_generator import tiny

    reg, _ = faulty
    tiny().save_pretrained(tmp_path / "model")
    recipe = validate_data({"num_images": 2, "output": str(tmp_path / "out"), "grid": False, "report": False,
                            "generator": {"plugin": "sd", "model": str(tmp_path / "model"), "steps": 2, "chunk": 4,
                                          "layout": {"enabled": False}, "semantic_guidance": {"start": 0.0}},
                            "guidance_classifier": {"plugin": "fault-rounds"}}, reg)
    with pytest.raises(PluginContractError, match=r"^guidance_classifier 'fault-rounds' \(from acme-stages\) has a zero gradient .* "
                                                  r"for all 4 image\(s\) \(a chunk the generator padded to 4 slots; the run's samples "
                                                  r"in it: 0, 1\) on the first guided step"):
        run_recipe(recipe, registry=reg, progress=False)
    assert collect_rows(tmp_path / "out") == []


# ---------------------------------------------------------------- registration, commands, output


def test_reserved_config_names_are_refused_and_documented(faulty):
    with pytest.raises(Exception, match=r"no expert named 'fault-reserved'\. Its plugin was left out: acme-reserved: .*declares "
                                        r"Config field\(s\) 'weight', 'align'"):
        faulty[0].get("expert", "fault-reserved")
    doc = (ROOT / "docs" / "plugins.md").read_text()
    section = doc[doc.index("## Reserved names"):]
    for kind, names in RESERVED.items():
        assert all(f"`{n}`" in section for n in names), (kind, names)


def _reload(monkeypatch, dists, only, modules, **env):
    from synfer.engine.registry import Registry

    monkeypatch.syspath_prepend(str(dists[list(FAULTS).index(only)]))
    for m in modules:
        monkeypatch.delitem(sys.modules, m, raising=False)  # imported by the module fixture: import it afresh
    for k, v in {"SYNFER_PLUGINS": only, "SYNFER_DISABLE_PLUGINS": "synfer", **env}.items():
        monkeypatch.setenv(k, v)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = Registry()
        reg.load_entrypoints()
    return reg, [str(w.message) for w in caught]


def test_a_slow_import_is_named_in_one_warning(monkeypatch, dists):
    _, msgs = _reload(monkeypatch, dists, "acme-slow", ["fault_plugins.slow_import"], SYNFER_SLOW_IMPORT_S="0.1")
    assert len(msgs) == 1 and msgs[0].startswith("synfer plugin 'acme-slow' (fault_plugins.slow_import, from acme-slow) took 0.")
    assert msgs[0].endswith("s to import, which every synfer command waits for (--help too); import heavy modules (torch, ...) "
                            "inside the functions that use them")


def test_what_a_plugin_prints_goes_to_stderr(monkeypatch, dists, capsys):
    reg, _ = _reload(monkeypatch, dists, "acme-chatty", ["fault_plugins.print_at_import"])
    _vote(reg, "fault-chatty")
    out, err = capsys.readouterr()
    assert out == "" and "acme-chatty: loading weights lazily, hello!" in err and "acme-chatty: predicting" in err


def test_commands_named_like_synfer_or_another_plugin_are_refused_naming_both(faulty, monkeypatch):
    from synfer.commands.cli import LazyGroup
    from synfer.commands.train import train_cli

    # `synfer train` is one group per process: an earlier in-process `synfer` call filled it with the built-ins'
    # commands, which would then look like synfer's own here. Start it from synfer's own commands.
    monkeypatch.setattr(train_cli, "commands", {k: c for k, c in train_cli.commands.items()
                                                if (c.callback.__module__ if c.callback else "synfer").startswith("synfer.")})
    reg, _ = faulty
    core = {n: click.Command(n) for n in ("run", "plugins")}
    cli = LazyGroup("synfer", commands=dict(core))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg.add_commands(cli)
    msgs = sorted(str(w.message) for w in caught if "adds the command" in str(w.message))
    who = "synfer plugin acme-clash-commands adds the command"
    assert msgs == [f"{who} 'synfer Plugins', which synfer itself already has; acme-clash-commands's is left out: rename it",
                    f"{who} 'synfer acme-hello', which synfer plugin acme-commands already has; acme-clash-commands's is left out: rename it",
                    f"{who} 'synfer run', which synfer itself already has; acme-clash-commands's is left out: rename it",
                    f"{who} 'synfer train generator', which synfer itself already has; acme-clash-commands's is left out: rename it"]
    assert cli.commands["run"] is core["run"] and "Plugins" not in cli.commands and "acme-own" in cli.commands
    assert cli.commands["acme-hello"].callback.__module__ == "fault_plugins.commands"
    assert cli.subgroup("train").commands["generator"].callback.__module__.startswith("synfer_plugins.sd")


@pytest.mark.slow  # subprocesses
def test_help_lists_each_command_once_and_plugins_json_stays_json(dists):
    env = subprocess_env(HERE, *dists)
    helps = subprocess.run(SYNFER + ["--help"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert helps.returncode == 0, helps.stderr
    names = [line.split()[0] for line in helps.stdout.split("Commands:")[1].splitlines() if line.startswith("  ")]
    assert len(names) == len(set(n.lower() for n in names)) and "run" in names and "acme-own" in names
    for name in ("synfer run", "synfer Plugins", "synfer acme-hello", "synfer train generator"):
        assert helps.stderr.count(f"acme-clash-commands adds the command '{name}'") == 1, helps.stderr
    assert "acme-chatty: loading" in helps.stderr and "acme-chatty" not in helps.stdout
    run_help = subprocess.run(SYNFER + ["run", "--help"], capture_output=True, text=True, env=env, cwd=ROOT).stdout
    assert "Run a recipe" in run_help and "acme-clash" not in run_help  # the core's run, whatever a plugin added
    out = subprocess.run(SYNFER + ["plugins", "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
    data = json.loads(out.stdout)
    assert {"acme-exit-import", "acme-interrupt-import", "acme-exit-hook", "acme-reserved"} <= {f["entry_point"] for f in data["failed"]}
    assert "fault-chatty" in {r["name"] for r in data["plugins"]}


@pytest.mark.slow  # subprocesses
def test_a_run_whose_expert_exits_in_init_stops_with_one_line(dists, tmp_path):
    from test_faults import QUICKSTART

    env = subprocess_env(HERE, *dists)
    run = subprocess.run(SYNFER + ["-p", "no:acme", "-p", "no:acme-experts", "run", *QUICKSTART, f"output={tmp_path / 'o'}",
                                   "experts=[{plugin: fault-exit-init}]"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 1 and run.stdout == "", (run.stdout, run.stderr)
    assert "Error: expert 'fault-exit-init' (from acme-stages) failed in __init__(): called sys.exit(3)" in run.stderr
    assert "Traceback" not in run.stderr


def test_calibrate_takes_the_writer_lock(tmp_path):
    from synfer.commands.calibrate import calibrate_dataset
    from synfer.engine.lock import LockError, OutputLock

    with OutputLock(tmp_path, "synfer run"):
        with pytest.raises(LockError, match=rf"{tmp_path} is being written by PID \d+ .*\(synfer run\)"):
            calibrate_dataset(tmp_path, recipe=None)
