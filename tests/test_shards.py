"""Issue 42, item 4: the `images_per_folder` layout (images/<index // N>/<index>.png) for runs of a million images.

A sharded run resumes to the same bytes after a kill at each crash point, two torchrun processes write what one
does, `synfer eval`, the report, the card, `datasets.load_dataset("imagefolder")` and `open_dataset().to_datasets()`
read it; its pixels are the flat layout's, and a flat run's recipe.json does not mention the key.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_scaleout import POINTS, _env, _run, _write_recipe, snapshot

from synfer.engine.dataset import METADATA, PARTS, DatasetWriter, image_name, merge, part_name, read_metadata

PER_FOLDER = 4


def _images(files: dict[str, bytes]) -> dict[str, bytes]:
    """Image bytes by base name (the layout's folders left out), to compare pixels across layouts."""
    return {k.rsplit("/", 1)[1]: v for k, v in files.items() if "/images/" in k}


def test_image_name_layouts():
    assert image_name(12345) == "images/00012345.png"  # the default: unchanged
    assert image_name(12345, "png", 1000) == "images/00012/00012345.png"
    assert image_name(9999, "jpg", 10000) == "images/00000/00009999.jpg"
    assert image_name(10000, "png", 10000) == "images/00001/00010000.png"
    with pytest.raises(ValueError, match="images_per_folder must be an int >= 1"):
        DatasetWriter("unused", images_per_folder=0)


def test_writer_resume_and_merge_in_sub_folders(tmp_path):
    from PIL import Image

    for rank in (0, 1):  # two ranks of a killed run, sharing sub-folder 00000 and 00001
        w = DatasetWriter(tmp_path, part=part_name(rank), images_per_folder=3)
        w.write_many([(i, Image.new("RGB", (4, 4), (i, i, i)), {"label": "happy"}) for i in range(rank, 7, 2)])
    (tmp_path / "images" / "00001" / ".00000005.png.tmp").write_bytes(b"half")  # a kill mid-save
    (tmp_path / "images" / "00001" / "00000004.png").unlink()  # listed, then lost: redone on resume
    w = DatasetWriter(tmp_path, images_per_folder=3)
    assert w.done == {0, 1, 2, 3, 5, 6}
    assert not (tmp_path / "images" / "00001" / ".00000005.png.tmp").exists()
    w.write(4, Image.new("RGB", (4, 4), (4, 4, 4)), {"label": "happy"})
    rows = merge(tmp_path)
    assert [r["file_name"] for r in rows] == [f"images/{i // 3:05d}/{i:08d}.png" for i in range(7)]
    assert not (tmp_path / PARTS).exists()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["00000", "00001", "00002"]
    assert [len(list(p.iterdir())) for p in sorted((tmp_path / "images").iterdir())] == [3, 3, 1]
    assert [r["index"] for r in read_metadata(tmp_path)] == list(range(7))


def test_flat_recipe_json_is_unchanged_and_another_layout_is_refused(tmp_path, registry):
    from synfer.engine.recipe import load_recipe
    from synfer.engine.resume import ResumeMismatch, check_resume, resolved_recipe

    flat = load_recipe(_write_recipe(tmp_path / "flat.yaml", tmp_path / "ds"), registry=registry)
    assert "images_per_folder" not in resolved_recipe(flat, registry)  # recipe.json and the card's hash: as before
    sharded = load_recipe(_write_recipe(tmp_path / "s.yaml", tmp_path / "ds", images_per_folder=PER_FOLDER), registry=registry)
    assert resolved_recipe(sharded, registry)["images_per_folder"] == PER_FOLDER
    (tmp_path / "ds").mkdir()
    check_resume(flat, tmp_path / "ds", [], registry=registry)
    with pytest.raises(ResumeMismatch, match=r"images_per_folder \('<unset>' -> 4\)"):
        check_resume(sharded, tmp_path / "ds", [], registry=registry)
    (tmp_path / "ds" / "recipe.json").unlink()
    check_resume(sharded, tmp_path / "ds", [], registry=registry)
    with pytest.raises(ResumeMismatch, match=r"images_per_folder \(4 -> '<unset>'\)"):
        check_resume(flat, tmp_path / "ds", [], registry=registry)


def test_an_evaluator_writing_into_a_sub_folder_is_caught(tmp_path):
    from PIL import Image

    from synfer.contract.contracts import changed_files, dataset_state

    w = DatasetWriter(tmp_path, images_per_folder=2)
    w.write_many([(i, Image.new("RGB", (4, 4), (i, i, i)), {"label": "happy"}) for i in range(5)])
    before = dataset_state(tmp_path)
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "images" / "00001" / "00000003.png")
    assert changed_files(tmp_path, before, dataset_state(tmp_path)) == ["images/00001/00000003.png"]


@pytest.fixture(scope="module")
def sharded_ref(tmp_path_factory):
    """One uninterrupted sharded run (12 images, 4 a folder, report on) and a flat run of the same recipe."""
    tmp = tmp_path_factory.mktemp("shards")
    env = _env(tmp)
    out, flat = tmp / "ref" / "ds", tmp / "flat" / "ds"
    for d in (out, flat):
        d.parent.mkdir()
    done = _run(_write_recipe(tmp / "ref.yaml", out, images_per_folder=PER_FOLDER, report=True), env)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run(_write_recipe(tmp / "flat.yaml", flat, report=True), env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"tmp": tmp, "env": env, "out": out, "files": snapshot(out), "flat": snapshot(flat)}


@pytest.mark.slow  # subprocess runs
def test_sharded_run_layout_pixels_report_and_card(sharded_ref):
    out, files, flat = sharded_ref["out"], sharded_ref["files"], sharded_ref["flat"]
    names = sorted(k for k in files if "/images/" in k)
    assert names == [f"ds/images/{i // PER_FOLDER:05d}/{i:08d}.png" for i in range(12)]
    assert _images(files) == _images(flat)  # the layout moves files; pixels are the same bytes
    rows = read_metadata(out)
    assert [r["file_name"] for r in rows] == [n.removeprefix("ds/") for n in names]  # relative to the folder
    flat_rows = [json.loads(line) for line in flat["ds/metadata.jsonl"].splitlines()]
    assert [{**r, "file_name": None} for r in rows] == [{**r, "file_name": None} for r in flat_rows]
    assert json.loads(files["ds/recipe.json"])["images_per_folder"] == PER_FOLDER
    assert "images_per_folder" not in json.loads(flat["ds/recipe.json"])
    assert files["ds/report.html"].count(b"<img ") == flat["ds/report.html"].count(b"<img ") > 0
    assert json.loads(files["ds/metrics.json"])["count"] == 12.0  # the run's own evaluator read every row's image
    from huggingface_hub import DatasetCard

    from synfer.engine.card import CARD

    card = DatasetCard(files[f"ds/{CARD}"].decode())
    assert card.data.to_dict()["configs"][0]["data_files"][0]["path"] == ["metadata.jsonl", "images/**"]


@pytest.mark.slow  # subprocess runs
@pytest.mark.parametrize("point", POINTS)
def test_sharded_run_killed_at_each_point_resumes_to_identical_files(sharded_ref, point):
    tmp, ref = sharded_ref["tmp"], sharded_ref["files"]
    out = tmp / point.replace(":", "-") / "ds"
    out.parent.mkdir()
    recipe = _write_recipe(tmp / f"{point.replace(':', '-')}.yaml", out, images_per_folder=PER_FOLDER, report=True)
    killed = _run(recipe, _env(tmp, SYNFER_CRASH_AT=point))
    assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
    resumed = _run(recipe, _env(tmp))
    assert resumed.returncode == 0, (point, resumed.stderr[-2000:])
    got = snapshot(out)
    assert sorted(got) == sorted(ref), (point, set(got) ^ set(ref))
    assert [k for k in ref if got[k] != ref[k]] == [], point


@pytest.mark.slow  # subprocess runs
def test_sharded_torchrun_two_processes_equal_one(tmp_path):
    """Two torchrun ranks (chunk 1: rank 0 the even indices, rank 1 the odd ones) share each sub-folder; the merged
    folder is the one process's, byte for byte."""
    env = _env(tmp_path)
    data = {"num_images": 8, "generator": {"plugin": "dummy", "batch_size": 1}, "images_per_folder": 3}
    one, two = tmp_path / "one" / "ds", tmp_path / "two" / "ds"
    for d in (one, two):
        d.parent.mkdir()
    r1 = _run(_write_recipe(tmp_path / "one.yaml", one, **data), env)
    assert r1.returncode == 0, r1.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "synfer", "run",
           str(_write_recipe(tmp_path / "two.yaml", two, **data))]
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = snapshot(one), snapshot(two)
    assert sorted(k for k in a if "/images/" in k) == [f"ds/images/{i // 3:05d}/{i:08d}.png" for i in range(8)]
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert not (two / PARTS).exists()


@pytest.mark.slow  # subprocess runs
def test_synfer_eval_on_a_sharded_run(sharded_ref):
    """`synfer eval` (the run's own evaluator, then diversity, which opens every image) reads the sub-folders,
    and its no-write check lists them (an image it rewrote would fail the command)."""
    out, env = sharded_ref["out"], sharded_ref["env"]
    before = {p: p.read_bytes() for p in (out / "images").rglob("*.png")}
    for extra in ([], ["--evaluators", "dummy-count,diversity"]):
        r = subprocess.run([sys.executable, "-m", "synfer", "eval", str(out), *extra], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["count"] == 12.0
    assert metrics["diversity"] > 0
    assert {p: p.read_bytes() for p in (out / "images").rglob("*.png")} == before


@pytest.mark.slow  # subprocess runs (the shared reference)
def test_sharded_run_loads_in_datasets(sharded_ref, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the cache of this load only; nothing is downloaded
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    from synfer.api import open_dataset

    out = sharded_ref["out"]
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 12
    by_index = {r["index"]: r for r in ds}
    assert sorted(by_index) == list(range(12))
    from PIL import Image

    for i in (0, 5, 11):
        with Image.open(out / image_name(i, "png", PER_FOLDER)) as im:
            assert by_index[i]["image"].tobytes() == im.convert("RGB").tobytes()
    hf = open_dataset(out).to_datasets()
    assert len(hf) == 12 and hf["index"] == list(range(12))
    assert hf[7]["image"].tobytes() == by_index[7]["image"].tobytes()
    names = hf.features["label"].names
    assert [names[k] for k in hf["label"]] == [by_index[i]["label"] for i in range(12)]
