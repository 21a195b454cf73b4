"""The dataset card (README.md) and provenance manifest every run writes (synfer.engine.card): the Hub's DatasetCard parses
it, every model that touched an image is named with its licence and weights' sha256, the strictest term comes
first and non-commercial terms anywhere are said, the bytes do not depend on the output path, and the folder
still loads as an imagefolder."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import DatasetCard
from PIL import Image

from synfer.engine import card as C
from synfer import labels as L
from synfer.engine.dataset import DatasetWriter
from synfer.engine.pipeline import run_recipe
from synfer.engine.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY_CNN = ROOT / "plugins" / "models" / "tiny-cnn"


def _run(tmp_path, registry, name="out", **extra):
    data = {"seed": 3, "num_images": 10, "output": str(tmp_path / name), "report": False, "grid": False,
            "generator": {"plugin": "dummy", "batch_size": 4},
            "experts": [{"plugin": "dummy-expert"}, {"plugin": "tiny-cnn", "weight": 0.5}], **extra}
    path = tmp_path / f"{name}.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path, registry=registry)
    run_recipe(recipe, registry=registry, progress=False)
    return recipe, Path(recipe.output)


def _folder_sha256(root: Path) -> str:
    lines = [f"{p.relative_to(root).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n"
             for p in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).parts) if p.is_file() and "work" not in p.relative_to(root).parts]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def test_run_writes_a_card_the_hub_parses(tmp_path, registry, monkeypatch):
    recipe, out = _run(tmp_path, registry)
    card = DatasetCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "other"  # two plugins of the test suite declare none
    assert meta["task_categories"] == ["image-classification"] and meta["size_categories"] == ["n<1K"]
    assert meta["label_names"] == list(L.LABEL_SPACES["affectnet8"])
    assert meta["configs"][0]["data_files"][0]["split"] == "train" and meta["synfer"]["splits"] == {"train": 10}
    assert meta["synfer"]["seed"] == 3
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["recipe"]["sha256"] == hashlib.sha256((out / "recipe.json").read_bytes()).hexdigest() == meta["synfer"]["recipe_sha256"]
    models = {(m["role"], m["plugin"]): m for m in prov["models"]}
    assert set(models) == {("prompter", "template"), ("generator", "dummy"), ("expert", "dummy-expert"), ("expert", "tiny-cnn")}
    assert models[("expert", "tiny-cnn")]["sha256"] == _folder_sha256(TINY_CNN)
    assert models[("expert", "tiny-cnn")]["licence"].startswith("MIT") and models[("generator", "dummy")]["licence"].startswith("not declared")
    assert prov["not_declared"] == ["generator dummy", "expert dummy-expert"] and prov["non_commercial"] is False
    text = card.text
    assert text.index("**Strictest term:** not declared") < text.index("## Summary")  # the strictest term at the top
    assert "| expert | `tiny-cnn` | synfer" in text and models[("expert", "tiny-cnn")]["sha256"][:16] in text
    sad = sum(1 for r in map(json.loads, (out / "metadata.jsonl").read_text().splitlines()) if r["preassigned_label"] == "sad")
    assert f"| sad | {sad} | 0 | {sad} | 0 |" in text  # the dummy expert relabels every sad image
    # the imagefolder loader of `datasets` still reads the folder, README.md and all
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 10 and set(ds.column_names) >= {"image", "label", "kept"}
    hub = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf2"))  # as the Hub reads the card's configs
    assert len(hub) == 10


def test_card_bytes_do_not_depend_on_the_output_path_and_reuse_hashes(tmp_path, registry, monkeypatch):
    _, a = _run(tmp_path / "a", registry)
    recipe, b = _run(tmp_path / "b", registry)
    for name in ("README.md", "provenance.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    calls = []
    real = C._file_sha256
    monkeypatch.setattr(C, "_file_sha256", lambda p: calls.append(p) or real(p))
    before = (b / "README.md").read_bytes()
    C.write_card(b, recipe, registry)
    assert calls == [b / "recipe.json"]  # tiny-cnn's weights are unchanged: their sha256 comes from the last manifest
    assert (b / "README.md").read_bytes() == before


def test_non_commercial_terms_anywhere_are_stated(tmp_path, registry):
    recipe, out = _run(tmp_path, registry)
    fake = tmp_path / "retinaface.pth"
    fake.write_bytes(b"not real weights")
    nc_model = tmp_path / "cnn-nc"
    shutil.copytree(TINY_CNN, nc_model)
    (nc_model / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# a lab's classifier\n")
    data = recipe.model_dump()
    data["experts"] = [{"plugin": "dummy-expert", "align": {"plugin": "retinaface", "weights": str(fake)}},
                       {"plugin": "tiny-cnn", "weights": str(nc_model)}]
    C.write_card(out, type(recipe)(**data), registry)
    prov = json.loads((out / "provenance.json").read_text())
    det = next(m for m in prov["models"] if m["role"] == "face_detector")
    assert det["plugin"] == "retinaface" and det["sha256"] == hashlib.sha256(b"not real weights").hexdigest()
    assert "CC BY-NC-ND" in det["data_terms"] and det["licence"].startswith("not declared for")  # a copy the recipe points at
    cnn = next(m for m in prov["models"] if m["plugin"] == "tiny-cnn")
    assert cnn["licence"] == "cc-by-nc-4.0" and cnn["sha256"] == _folder_sha256(nc_model)
    assert prov["non_commercial"] is True and prov["strictest_term"]["term"] in ("cc-by-nc-4.0", det["data_terms"])
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "other" and "non-commercial" in card.data.tags
    top = card.text.split("## Summary")[0]
    assert "Non-commercial terms apply" in top and "not be used commercially" in top


def test_source_faces_terms_come_from_their_source_plugins(tmp_path, registry):
    w = DatasetWriter(tmp_path / "fetext")
    for i, src in enumerate(["procedural", "procedural", "affectnet-csv", "lab-scrape"]):
        w.write(i, Image.new("RGB", (8, 8)), {"label": 1, "expression": "happy", "source": src})
    got = {s.source: s for s in C.source_entries([{"plugin": "x", "layout": {"source": str(tmp_path / "fetext")}}], registry)}
    assert {k: v.faces for k, v in got.items()} == {"affectnet-csv": 1, "lab-scrape": 1, "procedural": 2}
    assert got["procedural"].terms.startswith("MIT") and "non-commercial" in got["affectnet-csv"].terms
    assert got["lab-scrape"].terms.startswith("not declared")
    assert [C.strictness(got[k].terms) for k in ("procedural", "lab-scrape", "affectnet-csv")] == [0, 2, 3]
    assert C.strictness("CreativeML OpenRAIL-M") == 1


def test_plugins_list_their_licences():
    from synfer.commands.cli import main

    res = CliRunner().invoke(main, ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    rows = {(r["stage"], r["name"]): r for r in json.loads(res.output)["plugins"]}
    assert rows[("face_detector", "retinaface")]["data_terms"].startswith("CC BY-NC-ND")
    assert rows[("generator", "sd")]["licence"].startswith("MIT") and rows[("source", "rafdb")]["data_terms"]
    builtin = [r for r in rows.values() if r["provider"] == "synfer"]
    missing = [r["name"] for r in builtin if not r["licence"]]
    assert builtin and not missing, f"built-in plugins without a `licence` class attribute (synfer.engine.card): {missing}"
    text = CliRunner().invoke(main, ["plugins"]).output
    assert "retinaface" in text and "data: CC BY-NC-ND" in text
