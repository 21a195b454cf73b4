"""The Python API (synfer.api, docs/api.md): docs/api.md's session runs block by block, recipes resolve as on the
command line, and `to_datasets()` gives the same ClassLabel for a run and a FEText set."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

import synfer
from synfer import labels as L
from synfer.engine.dataset import DatasetWriter

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "plugins" / "models" / "tiny-sd" / "unet"


def _dummy_recipe(tmp_path, **extra) -> dict:
    return {"seed": 3, "num_images": 12, "output": str(tmp_path / "out"), "report": False, "grid": False,
            "generator": {"plugin": "dummy", "batch_size": 4},
            "experts": [{"plugin": "dummy-expert"}, {"plugin": "tiny-cnn", "weight": 0.5}], **extra}


def _fetext(root: Path, n: int = 8) -> Path:
    """A labelled set as `synfer fetext build` writes it: `label` an index into affectnet8, `expression` its name."""
    w = DatasetWriter(root)
    for i in range(n):
        name = L.LABEL_SPACES["affectnet8"][i % 8]
        aus = {k: round(0.1 * (j % 3), 2) for j, k in enumerate(L.AU_KEYS)}
        w.write(i, Image.new("RGB", (16, 16), (30 * (i % 8), 0, 0)), {"label": i % 8, "expression": name, "aus": aus, "source": "procedural"})
    return root


def test_import_synfer_stays_light():
    code = ("import sys, synfer; assert 'synfer.api' not in sys.modules; f = synfer.validate; "
            "assert 'synfer.api' in sys.modules; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert {'run', 'stage', 'label', 'open_dataset', 'load_recipe', 'validate'} <= set(dir(synfer)); "
            "import synfer.commands.label; assert synfer.label.__module__ == 'synfer.api', 'the submodule shadows synfer.label()'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    with pytest.raises(AttributeError, match="no attribute 'rn'"):
        synfer.rn


def test_settings_merge_replace_and_devices(tmp_path, registry):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_dummy_recipe(tmp_path)))
    r = synfer.load_recipe(path, "experts.1.weight=2", registry=registry, num_images=5, generator={"size": 8})
    assert r.num_images == 5 and r.generator == {"plugin": "dummy", "batch_size": 4, "size": 8}  # merged, not replaced
    assert r.experts[1]["weight"] == 2
    on = synfer.load_recipe(path, registry=registry, device="cuda:1")
    assert on.experts[1] == {"plugin": "tiny-cnn", "weight": 0.5, "device": "cuda:1"}  # tiny-cnn's Config has a device
    assert on.experts[0] == {"plugin": "dummy-expert"} and "device" not in on.generator  # these have none
    problems = synfer.validate(path, registry=registry, num_images=-1, generator={"steps": "many"})
    assert len(problems) == 2 and problems[0].startswith("num_images:") and problems[1].startswith("generator.steps:")
    assert synfer.validate(path, registry=registry) == []
    assert synfer.validate(tmp_path / "nope.yaml", registry=registry)[0].startswith("no recipe file")


def test_run_to_datasets_matches_fetext_classlabel(tmp_path, registry):
    data = synfer.run(_dummy_recipe(tmp_path), registry=registry, progress=False)
    assert len(data) == 12 and data.summary.generated == 12 and data.label_space == "affectnet8"
    ds = data.to_datasets()
    fetext = synfer.open_dataset(_fetext(tmp_path / "fetext")).to_datasets()
    assert fetext.features["label"] == ds.features["label"] == ds.features["preassigned_label"]
    assert ds.features["label"].names == list(L.LABEL_SPACES["affectnet8"])
    assert fetext["label"] == [i % 8 for i in range(8)]  # the index on disk means the same class here
    for i, row in enumerate(data.rows):
        assert ds[i]["label"] == L.LABEL_SPACES["affectnet8"].index(row["label"])
        assert ds[i]["preassigned_label"] == L.LABEL_SPACES["affectnet8"].index(row["preassigned_label"])
        assert ds[i]["kept"] is row["kept"] and ds[i]["AU12"] == pytest.approx(row["aus"]["AU12"], abs=1e-6)
        assert ds[i]["predictions"]["dummy-expert"] == pytest.approx(row["predictions"]["dummy-expert"], abs=1e-6)
        assert ds[i]["soft_label"] == pytest.approx(row["soft_label"], abs=1e-6)
    assert ds[0]["image"].size == (16, 16) and fetext[3]["AU2"] == pytest.approx(0.1)
    kept = ds.filter(lambda kept: kept, input_columns="kept")
    assert len(kept) == len(data.kept()) == sum(r["kept"] for r in data.rows)
    assert ds.features["kept"].dtype == "bool" and ds.features["AU1"].dtype == "float32"


def test_label_space_of_a_labelled_set(tmp_path):
    root = DatasetWriter(tmp_path / "raf")
    for i, name in enumerate(L.LABEL_SPACES["rafdb7"]):  # rafdb7 indices: affectnet8's would not match
        root.write(i, Image.new("RGB", (8, 8)), {"label": i, "expression": name})
    data = synfer.open_dataset(tmp_path / "raf")
    assert data.label_space == "rafdb7" and data.label(0) == "surprise"
    ds = data.to_datasets(label_space="affectnet8")  # the same rows in the generated sets' space
    assert ds["label"] == [L.LABEL_SPACES["affectnet8"].index(n) for n in L.LABEL_SPACES["rafdb7"]]
    with pytest.raises(Exception, match="not in label space affectnet7"):
        synfer.open_dataset(_fetext(tmp_path / "f8")).to_datasets(label_space="affectnet7")  # contempt has no index there


def test_stage_and_label_on_pil_images(tmp_path, registry):
    images = [Image.new("RGB", (16, 16), (30 * k + 5,) * 3) for k in (0, 1, 3)]  # neutral, happy, surprise by brightness
    expert = synfer.stage("expert", "dummy-expert", registry=registry, confuse_sad=False)
    assert expert.predict(images).argmax(1).tolist() == [0, 1, 3]
    recipe = {**_dummy_recipe(tmp_path), "experts": [{"plugin": "dummy-expert"}]}
    out = synfer.label(images, recipe, registry=registry, progress=False, output=str(tmp_path / "labelled"),
                       face_detector={"plugin": "whole-image"}, au_detector=None)
    assert [r["label"] for r in out.rows] == ["neutral", "happy", "surprise"] and [r["source_file"] for r in out.rows][0] == "000000.png"
    assert out.to_datasets()["label"] == [0, 1, 3]


@pytest.fixture
def session_dir(tmp_path, monkeypatch):
    """docs/api.md's working folder: recipes/ as in the repo, and the two small FEText sets `make demo` builds
    (the quickstart's layout source and FID reference), at toy scale."""
    from synfer.commands.fetext import build_fetext, load_fetext_recipe

    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    fetext = ROOT / "recipes" / "fetext-procedural.yaml"
    build_fetext(load_fetext_recipe(fetext, ["output=out/fetext-quick", "sources.0.num_images=64"]), progress=False)
    build_fetext(load_fetext_recipe(fetext, ["output=out/fetext-quick-test", "sources.0.split=test", "sources.0.num_images=32",
                                             "sources.0.seed=1"]), progress=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped tiny model not built (synfer bootstrap recipes/bootstrap.yaml)")
def test_api_doc_session_runs(session_dir, one_thread):
    """Every ```python block of docs/api.md, in order, in one namespace, as a notebook would run them."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)
    assert len(blocks) >= 9, "docs/api.md lost its examples"
    ns: dict = {}
    for i, code in enumerate(blocks, 1):
        exec(compile(code, f"docs/api.md (python block {i})", "exec"), ns)
    data, ds, test = ns["data"], ns["ds"], ns["test"]
    assert len(data) == 16 and data.summary.generated == 16 and (session_dir / "out/api-session/images").is_dir()
    assert ds.features["label"] == test.features["label"] and ds.features["label"].names == list(L.LABEL_SPACES["affectnet8"])
    assert len(ns["kept"]) == sum(data.kept_mask()) >= len(ns["confident"]) > 0
    assert all(a >= 0.5 for a in ns["confident"]["agreement"])
    assert ns["x"].shape == (len(ns["confident"]), 32, 32, 3) and 0.0 <= ns["accuracy"] <= 1.0
    assert ns["probs"].shape == (4, 8) and ns["probs"].sum(1) == pytest.approx([1.0] * 4, abs=1e-5)
    assert [s.image.size for s in ns["samples"]] == [(32, 32)] * 4
    assert [s.request.expression for s in ns["samples"]] == [r["preassigned_label"] for r in data.rows[:4]]
    assert len(ns["labelled"]) == 4 and all(set(r["aus"]) == set(L.AU_KEYS) for r in ns["labelled"].rows)
    # the run's card: parsed by the Hub's DatasetCard, every model named with its licence and weights' sha256
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(session_dir / "out" / "api-session" / "README.md")
    assert card.data.license == "mit" and card.data.label_names == list(L.LABEL_SPACES["affectnet8"])
    roles = {(m["role"], m["plugin"]) for m in ns["prov"]["models"]}
    assert roles == {("prompter", "template"), ("generator", "sd"), ("guidance_classifier", "tiny-cnn"), ("calibrator", "feranno"),
                     ("expert", "tiny-cnn")}
    gen = next(m for m in ns["prov"]["models"] if m["role"] == "generator")
    assert len(gen["sha256"]) == 64 and {"unet", "au_adapter.safetensors"} <= set(gen["parts"])
    assert "| generator adapter | `au_adapter.safetensors` |" in card.text
    assert [(s["source"], s["faces"]) for s in ns["prov"]["sources"]] == [("procedural", 64)]
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir="out/api-session", split="train")  # the card does not get in the way
    assert len(loaded) == 16 and loaded[0]["label"] == data.rows[0]["label"]
    assert json.loads((session_dir / "out/api-session/provenance.json").read_text()) == ns["prov"]
