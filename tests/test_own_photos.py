"""Your own photos, as a lab has them: a flat folder of unlabelled photos, class folders, and what `synfer label` writes
all become FEText sources, or fail with a message that says what to do; real photos get no invented appearance in their
captions; replacing a block's plugin by an override drops the old plugin's settings."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from synfer.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]
# words the template captioner uses for a procedural identity: a real photo's record knows none of these
APPEARANCE = ("bald", "hair", "beard", "moustache", "stubble", "glasses", "skin", "eyes", "young", "adult", "elderly", "middle-aged", "man")


def photos(folder: Path, n: int, size: int = 40, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"photo-{i}.jpg")
    return folder


def build(tmp_path, root, *extra):
    out = tmp_path / "fetext"
    source = {"plugin": "imagefolder", "root": str(root)}
    args = ["fetext", "build", str(ROOT / "recipes" / "fetext-procedural.yaml"), f"output={out}", "size=32", "au_detector=null",
            f"sources=[{json.dumps(source)}]", "--no-progress", *extra]
    return CliRunner().invoke(main, args), out


def rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_a_flat_photo_folder_says_what_to_do_or_builds_unlabelled(tmp_path):
    flat = photos(tmp_path / "my-photos", 3)
    res, out = build(tmp_path, flat)
    assert res.exit_code == 1, res.output
    assert "3 loose image(s) at the root" in res.output and "root/<class>/<image>" in res.output
    assert "synfer label" in res.output and "unlabelled: true" in res.output
    res, out = build(tmp_path, flat, "sources.0.unlabelled=true")
    assert res.exit_code == 0, res.output
    written = rows(out)
    assert len(written) == 3 and all(r["expression"] is None and r["label"] is None for r in written)
    for r in written:  # nothing is known of a real photo's person, and no expression: the caption says neither
        assert not any(w in r["caption"].lower().split() or f" {w} " in f" {r['caption'].lower()} " for w in APPEARANCE), r["caption"]


def test_class_folders_with_loose_files_count_them_and_an_empty_source_is_an_error(tmp_path):
    root = tmp_path / "faces"
    photos(root / "happy", 2)
    photos(root, 1, seed=1)  # a stray file at the root
    res, out = build(tmp_path, root)
    assert res.exit_code == 0, res.output
    assert len(rows(out)) == 2 and "loose file at the root" in res.output
    empty = tmp_path / "empty"
    (empty / "happy").mkdir(parents=True)
    res, _ = build(tmp_path, empty, f"output={tmp_path / 'none'}")
    assert res.exit_code == 1 and "the sources gave no faces" in res.output, res.output


def test_synfer_label_output_is_a_fetext_source(tmp_path):
    """`synfer label` (whole-image faces, the shipped tiny-cnn as the one expert) writes a folder that imagefolder reads
    with its labels; `face_detector.plugin=whole-image` drops retinaface's `threshold` from the recipe file."""
    flat = photos(tmp_path / "crops", 4, size=32)
    labelled = tmp_path / "labelled"
    res = CliRunner().invoke(main, ["label", str(flat), "--recipe", str(ROOT / "recipes" / "label-photos.yaml"), f"output={labelled}",
                                    "face_detector.plugin=whole-image", "au_detector=null", "label_space=affectnet8",
                                    "experts=[{plugin: tiny-cnn}]", "vote.threshold=0"])
    assert res.exit_code == 0, res.output
    labels = [r["label"] for r in rows(labelled)]
    assert len(labels) == 4
    res, out = build(tmp_path, labelled)
    assert res.exit_code == 0, res.output
    built = rows(out)
    assert [r["expression"] for r in built] == labels and all(r["attributes"]["file"].startswith("images/") for r in built)


def test_replacing_a_plugin_by_override_drops_the_old_plugins_settings():
    from synfer.engine.recipe import apply_overrides

    data = {"face_detector": {"plugin": "retinaface", "threshold": 0.8}}
    assert apply_overrides(data, ["face_detector.plugin=whole-image"]) == {"face_detector": {"plugin": "whole-image"}}
    # settings given on the command line stay, before or after the plugin
    both = apply_overrides(data, ["face_detector.size=3", "face_detector.plugin=x", "face_detector.zoom=1"])
    assert both == {"face_detector": {"plugin": "x", "size": 3, "zoom": 1}}
    assert apply_overrides(data, ["face_detector.plugin=retinaface"]) == data  # the same plugin: nothing dropped


def test_landmarks_marks_a_face_it_cannot_measure_as_null(monkeypatch):
    """No face in the mesh: the AUs are unknown (None), not all 0; FEText counts and warns (test above: the summary)."""
    pytest.importorskip("torch")
    from synfer_plugins.landmark_aus import LandmarkAUDetector

    from synfer.stages import FaceRecord

    det = LandmarkAUDetector(LandmarkAUDetector.Config(detector=None))
    monkeypatch.setattr(LandmarkAUDetector, "landmarks", lambda self, images: (np.zeros((2, 468, 3)), np.array([0.9, 0.1])))
    monkeypatch.setattr("synfer_plugins.landmark_aus.intensities", lambda feats: {"AU1": 0.5})
    monkeypatch.setattr("synfer_plugins.landmark_aus.features", lambda p: {})
    out = det.detect([FaceRecord(image=Image.new("RGB", (8, 8)), expression=None)] * 2)
    assert out == [{"AU1": 0.5}, None]


def test_fetext_warns_about_faces_without_aus(tmp_path, monkeypatch):
    from synfer_plugins.landmark_aus import LandmarkAUDetector

    monkeypatch.setattr(LandmarkAUDetector, "detect", lambda self, records: [None] * len(records))
    root = tmp_path / "faces"
    photos(root / "sad", 2)
    res, out = build(tmp_path, root, "au_detector={plugin: landmarks}")
    assert res.exit_code == 0, res.output
    assert "warning: landmarks measured no AUs on 2 of 2 face(s)" in res.output
    assert all(r["aus"] is None for r in rows(out))
    assert json.loads((out / "fetext_summary.json").read_text())["aus_unmeasured"] == 2


def test_fetext_validate_names_missing_model_folders(tmp_path):
    res = CliRunner().invoke(main, ["fetext", "validate", str(ROOT / "recipes" / "fetext-procedural.yaml"),
                                    "captioner.plugin=mllm", f"captioner.model={tmp_path / 'llava'}",
                                    "upscaler.plugin=sd-upscaler", f"upscaler.model={tmp_path / 'x4'}"])
    assert res.exit_code == 1
    assert "captioner.model:" in res.output and "plugin: template" in res.output, res.output
    assert "upscaler.model:" in res.output and "plugin: lanczos" in res.output, res.output
