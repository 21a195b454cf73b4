"""The run loop with dummy stages: complete, resumable, deterministic, loadable."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import HERE, make_dist, subprocess_env

from synfer import labels as L
from synfer.engine.dataset import METADATA, DatasetWriter, collect_rows, read_metadata
from synfer.engine.ensemble import ExpertEnsemble, Member
from synfer.engine.pipeline import plan, run_recipe
from synfer.engine.recipe import VoteConfig, load_recipe


def _recipe(tmp_path, registry, overrides=(), **data):
    base = {"seed": 3, "num_images": 12, "output": str(tmp_path / "out"), "generator": {"plugin": "dummy", "batch_size": 4}}
    base.update(data)
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(base))
    return load_recipe(p, overrides, registry=registry)


def test_plan_is_per_index(tmp_path, registry):
    r = _recipe(tmp_path, registry)
    a, b = plan(r), plan(r, limit=5)
    assert [x.seed for x in a[:5]] == [x.seed for x in b]
    assert len({x.seed for x in a}) == len(a)
    counts = {c: sum(x.expression == c for x in plan(r.model_copy(update={"num_images": 80}))) for c in L.LABEL_SPACES["affectnet8"]}
    assert min(counts.values()) >= 8 and max(counts.values()) <= 12  # the mix is spread evenly


def test_run_end_to_end_and_batch_size_invariance(tmp_path, registry):
    r1 = _recipe(tmp_path / "a", registry, experts=[{"plugin": "dummy-expert"}])
    s = run_recipe(r1, registry=registry, progress=False)
    assert s.generated == 12
    r2 = _recipe(tmp_path / "b", registry, ["generator.batch_size=5"], experts=[{"plugin": "dummy-expert"}])
    run_recipe(r2, registry=registry, progress=False)
    rows1, rows2 = read_metadata(r1.output), read_metadata(r2.output)
    assert [x["seed"] for x in rows1] == [x["seed"] for x in rows2]
    for a, b in zip(rows1, rows2):
        assert (tmp_path / "a/out" / a["file_name"]).read_bytes() == (tmp_path / "b/out" / b["file_name"]).read_bytes()
    for key in ("file_name", "seed", "prompt", "aus", "preassigned_label", "label", "soft_label", "agreement", "kept"):
        assert key in rows1[0]
    # the wrong expert turns every 'sad' into 'neutral' under the paper rule, nothing else
    for row in rows1:
        expect = "neutral" if row["preassigned_label"] == "sad" else row["preassigned_label"]
        assert row["label"] == expect
    assert s.per_class["sad"]["relabelled"] == s.per_class["sad"]["total"] > 0


@pytest.mark.slow  # subprocess runs
def test_killed_run_resumes_to_exact_plan(tmp_path):
    """Kill a real `synfer run` process half-way, rerun: every planned sample exactly once."""
    make_dist(tmp_path / "site", "synfer-dummy", {"dummy": "dummy_plugins"})
    env = subprocess_env(HERE, tmp_path / "site")
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "out"
    recipe.write_text(yaml.safe_dump({"seed": 1, "num_images": 24, "output": str(out),
                                      "generator": {"plugin": "dummy", "batch_size": 2, "delay": 0.25}}))
    cmd = [sys.executable, "-m", "synfer", "run", str(recipe)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if (out / METADATA).exists() and len((out / METADATA).read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(collect_rows(out))  # complete lines whose image exists: what the rerun finds done (a torn line is not)
    assert 0 < partial < 24
    done = subprocess.run(cmd + ["generator.delay=0"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = read_metadata(out)
    assert sorted(r["index"] for r in rows) == list(range(24))
    assert f"{24 - partial} generated now" in done.stdout and f"{partial} already on disk" in done.stdout, done.stdout

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 24 and "label" in ds.column_names and ds[0]["image"].size == (16, 16)


def test_writer_drops_torn_line_and_missing_files(tmp_path):
    from PIL import Image

    w = DatasetWriter(tmp_path)
    for i in range(3):
        w.write(i, Image.new("RGB", (4, 4)), {"label": "happy"})
    with open(tmp_path / METADATA, "a") as f:
        f.write('{"file_name": "images/00000009.png", "ind')  # torn by a crash
    (tmp_path / "images/00000001.png").unlink()
    w2 = DatasetWriter(tmp_path)
    assert w2.done == {0, 2}
    assert [r["index"] for r in read_metadata(tmp_path)] == [0, 2]


def _ens(rule, members, **kw):
    return ExpertEnsemble(members, "affectnet8", VoteConfig(rule=rule, **kw))


def _fixed(name, space, label, conf=0.9):
    classes = L.label_space(space)

    def predict(samples):
        p = np.full((len(samples), len(classes)), (1 - conf) / (len(classes) - 1))
        p[:, classes.index(label)] = conf
        return p

    return Member(name, 1.0, space, predict)


def test_paper_rule_relabels_exactly_on_disagreement():
    agree = _ens("paper", [_fixed("a", "affectnet8", "happy"), _fixed("b", "fer2013", "happy")])
    (v, preds), = agree([None], ["happy"])
    assert v.kept and L.LABEL_SPACES["affectnet8"][v.label] == "happy" and v.agreement == 1.0
    assert set(preds) == {"a", "b"}
    disagree = _ens("paper", [_fixed("a", "affectnet8", "sad"), _fixed("b", "fer2013", "sad")])
    (v, _), = disagree([None], ["happy"])
    assert L.LABEL_SPACES["affectnet8"][v.label] == "sad" and v.kept
    assert abs(v.soft.sum() - 1) < 1e-9
    strict = _ens("paper", [_fixed("a", "affectnet8", "sad", conf=0.5)], threshold=0.8)
    (v, _), = strict([None], ["happy"])
    assert not v.kept and L.LABEL_SPACES["affectnet8"][v.label] == "happy"


def test_seven_class_expert_in_eight_class_recipe():
    # contempt is invisible to a fer2013 expert: its vote comes only from the 8-class member
    ens = _ens("paper", [_fixed("seven", "fer2013", "anger", 0.6), _fixed("eight", "affectnet8", "contempt", 0.95)])
    (v, preds), = ens([None], ["contempt"])
    assert preds["seven"][L.LABEL_SPACES["affectnet8"].index("contempt")] == 0
    assert L.LABEL_SPACES["affectnet8"][v.label] == "contempt"


def test_majority_and_soft_average():
    members = [_fixed("a", "affectnet8", "sad"), _fixed("b", "affectnet8", "sad"), _fixed("c", "affectnet8", "happy")]
    (v, _), = _ens("majority", members)([None], ["happy"])
    assert L.LABEL_SPACES["affectnet8"][v.label] == "happy"  # tie 2 vs 1+prior -> preassigned stands
    (v, _), = _ens("majority", members, prior_weight=0.5)([None], ["happy"])
    assert L.LABEL_SPACES["affectnet8"][v.label] == "sad"
    (v, _), = _ens("soft-average", members, prior_weight=3.0)([None], ["happy"])
    assert L.LABEL_SPACES["affectnet8"][v.label] == "happy"


def test_calibrate_existing_dataset(tmp_path, registry):
    from synfer.commands.calibrate import calibrate_dataset

    r = _recipe(tmp_path, registry)  # no experts: labels stay preassigned
    run_recipe(r, registry=registry, progress=False)
    assert all(row["label"] == row["preassigned_label"] for row in read_metadata(r.output))
    r2 = _recipe(tmp_path, registry, experts=[{"plugin": "dummy-expert", "weight": 2.0}])
    counts = calibrate_dataset(r.output, r2, registry=registry, progress=False)
    rows = read_metadata(r.output)
    assert len(rows) == 12
    assert counts["sad"]["relabelled"] == counts["sad"]["total"] > 0
    assert all(row["label"] == "neutral" for row in rows if row["preassigned_label"] == "sad")
    assert set(rows[0]["predictions"]) == {"dummy-expert"}


def test_third_party_expert_votes_without_core_change(tmp_path, registry):
    """The example package's 7-class expert (no contempt) votes in an 8-class recipe."""
    r = _recipe(tmp_path, registry, experts=[{"plugin": "example-constant", "vote_for": "happy", "confidence": 0.9, "weight": 1.0}])
    run_recipe(r, registry=registry, progress=False)
    rows = read_metadata(r.output)
    assert all(set(row["predictions"]) == {"example-constant"} for row in rows)
    for row in rows:
        if row["preassigned_label"] == "contempt":  # it cannot see contempt: its vote moves the label to happy
            assert row["predictions"]["example-constant"][L.LABEL_SPACES["affectnet8"].index("contempt")] == 0
        assert row["label"] == "happy"


def test_rows_name_the_model_by_folder_and_hash_not_path(tmp_path):
    """No file of a run holds the machine's paths: rows name the generator as '<folder>@sha256:<16 hex>' (the card has
    the full digest), the same for a copy of the folder elsewhere."""
    import shutil

    from synfer_plugins.sd.generator import TINY_MODEL_DIR, model_id

    copy = tmp_path / "elsewhere" / TINY_MODEL_DIR.name
    shutil.copytree(TINY_MODEL_DIR, copy)
    ident = model_id(TINY_MODEL_DIR)
    assert ident.startswith(f"{TINY_MODEL_DIR.name}@sha256:") and len(ident.split(":")[1]) == 16
    assert model_id(copy) == ident and "/" not in ident


@pytest.mark.slow
def test_no_file_of_a_run_holds_a_machine_path(tmp_path):
    """A published dataset leaks no local paths: rows, recipe.json, metrics, report, card and provenance name models by
    folder and hash (the shipped models live under the repo; the output under tmp_path)."""
    from pathlib import Path

    from synfer.commands.report import write_report
    from synfer.engine.pipeline import run_recipe
    from synfer.engine.recipe import load_recipe

    ROOT = HERE.parent
    out = tmp_path / "run"
    run_recipe(load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"output={out}", "num_images=2", "generator.steps=2",
                                                                   "generator.layout.enabled=false", "evaluators=[{plugin: fer-accuracy}]"]),
               progress=False, finish=write_report)
    texts = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    assert {"metadata.jsonl", "recipe.json", "metrics.json", "report.html", "README.md", "provenance.json"} <= set(texts)
    leaks = {name: needle for name, text in texts.items() for needle in (str(tmp_path), str(ROOT), str(Path.home())) if needle in text}
    assert not leaks, leaks


def test_a_stage_that_cannot_be_built_leaves_no_dataset_behind(tmp_path, registry):
    """A plugin failing in __init__ stops the run naming it, before recipe.json or images/ exist (an empty images/
    folder once looked like a dataset to resume)."""
    import types

    from synfer import hookimpl
    from synfer.contract.contracts import PluginError
    from synfer.engine.pipeline import run_recipe
    from synfer.engine.recipe import validate_data
    from synfer.stages import Expert, StageConfig

    class Broken(Expert):
        name = "broken-at-init"
        label_space = "fer2013"

        class Config(StageConfig):
            pass

        def __init__(self, config=None):
            super().__init__(config)
            raise RuntimeError("no weights here")

        def predict(self, images):
            return None

    mod = types.ModuleType("broken_at_init")
    mod.register_stages = hookimpl(lambda register: register(Broken))
    registry.add(mod, provider="acme-broken")
    out = tmp_path / "out"
    recipe = validate_data({"num_images": 2, "output": str(out), "grid": False, "report": False, "generator": {"plugin": "dummy"},
                            "experts": [{"plugin": "broken-at-init"}]}, registry)
    with pytest.raises(PluginError, match="broken-at-init.*no weights here"):
        run_recipe(recipe, registry=registry, progress=False)
    assert not (out / "images").exists() and not (out / "recipe.json").exists()
