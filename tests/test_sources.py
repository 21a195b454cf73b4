"""Real-dataset FEText sources on tiny fixture folders in each dataset's own layout."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from synfer.engine.registry import Registry
from synfer_plugins import sources as S


def face(path, size=(40, 30), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return path


def build(name, **config):
    reg = Registry()
    reg.add(S)
    return reg.build("source", {"plugin": name, **config})


def test_all_sources_register():
    reg = Registry()
    reg.add(S)
    assert reg.names("source") == ["affectnet-csv", "fer2013-csv", "imagefolder", "rafdb"]


# ---------------------------------------------------------------- imagefolder


def imagefolder(root):
    face(root / "Happy" / "a.png", value=1)
    face(root / "Happy" / "b.jpg", value=2)
    corrupt(root / "Happy" / "broken.png")
    face(root / "angry" / "c.png", value=3)
    face(root / "Contempt" / "d.png", value=4)
    (root / "neutral").mkdir()
    (root / "happy" / "nested").mkdir(parents=True)
    face(root / "happy" / "nested" / "e.png", value=5)
    return root


def test_imagefolder_maps_folder_names_and_skips_corrupt(tmp_path):
    src = build("imagefolder", root=str(imagefolder(tmp_path / "d")))
    recs = list(src.records())
    assert [r.expression for r in recs] == ["anger", "contempt", "happy", "happy", "happy"]
    assert all(r.image.mode == "RGB" and r.image.size == (40, 30) for r in recs)
    assert all(r.source == "imagefolder" for r in recs)
    assert len(src.skipped) == 1 and "broken.png (unreadable" in src.skipped[0]
    # a smaller label space drops contempt, counted as filtered
    src = build("imagefolder", root=str(tmp_path / "d"), label_space="affectnet7", limit=3, tag="mine")
    recs = list(src.records())
    assert [r.expression for r in recs] == ["anger", "happy", "happy"]
    assert src.filtered == {"contempt not in affectnet7": 1} and recs[0].source == "mine"


def test_imagefolder_unknown_folder_is_a_teaching_error(tmp_path):
    root = imagefolder(tmp_path / "d")
    face(root / "bored" / "x.png")
    with pytest.raises(ValueError, match="bored.*classes"):
        list(build("imagefolder", root=str(root)).records())
    assert len(list(build("imagefolder", root=str(root), ignore_unknown=True).records())) == 5
    recs = list(build("imagefolder", root=str(root), classes={"bored": "neutral"}).records())
    assert sum(r.expression == "neutral" for r in recs) == 1


def test_imagefolder_index_folders_use_the_label_space(tmp_path):
    face(tmp_path / "0" / "a.png")
    face(tmp_path / "3" / "b.png")
    recs = list(build("imagefolder", root=str(tmp_path), label_space="fer2013").records())
    assert [r.expression for r in recs] == ["anger", "happy"]


def test_config_is_strict():
    with pytest.raises(Exception, match="extra"):
        S.ImageFolderSource.Config(root="x", lables="oops")
    with pytest.raises(Exception, match="no label space"):
        S.RafDBSource.Config(root="x", label_space="nope")


# ---------------------------------------------------------------- AffectNet


def test_affectnet_csv(tmp_path):
    images = tmp_path / "Manually_Annotated_Images"
    face(images / "1" / "a.jpg", size=(100, 80), value=1)
    face(images / "1" / "b.jpg", value=2)
    face(images / "2" / "c.jpg", value=3)
    face(images / "2" / "d.jpg", value=4)
    corrupt(images / "2" / "bad.jpg")
    rows = [  # subDirectory_filePath, face box, landmarks, expression, valence, arousal
        ("1/a.jpg", 10, 20, 50, 40, "1.0;2.0;3.0", 1, 0.8, 0.3),
        ("1/b.jpg", 0, 0, 40, 30, "1.0;2.0", 6, -0.5, 0.7),
        ("2/c.jpg", 0, 0, 40, 30, "", 8, 0, 0),  # none
        ("2/d.jpg", 0, 0, 40, 30, "", 10, 0, 0),  # non-face
        ("2/bad.jpg", 0, 0, 40, 30, "", 2, 0, 0),  # corrupt
        ("2/missing.jpg", 0, 0, 40, 30, "", 3, 0, 0),  # missing
        ("2/c.jpg", 0, 0, 40, 30, "", 7, 0.1, 0.1),  # contempt
    ]
    with open(tmp_path / "training.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks", "expression", "valence", "arousal"])
        w.writerows(rows)
    src = build("affectnet-csv", root=str(tmp_path))
    recs = list(src.records())
    assert [r.expression for r in recs] == ["happy", "anger", "contempt"]
    assert recs[0].image.size == (50, 40)  # cropped to the face box
    assert recs[0].attributes["valence"] == pytest.approx(0.8) and recs[0].attributes["arousal"] == pytest.approx(0.3)
    assert len(src.skipped) == 2 and "bad.jpg (unreadable" in src.skipped[0] and src.skipped[1].endswith("missing.jpg (missing)")
    assert src.filtered == {"none": 1, "non-face": 1}
    src = build("affectnet-csv", root=str(tmp_path), label_space="affectnet7", crop_face=False)
    recs = list(src.records())
    assert [r.expression for r in recs] == ["happy", "anger"] and recs[0].image.size == (100, 80)


# ---------------------------------------------------------------- RAF-DB


def test_rafdb(tmp_path):
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text(
        "train_00001.jpg 5\ntrain_00002.jpg 1\ntrain_00003.jpg 4\ntest_0001.jpg 7\ntrain_00004.jpg 9\n")
    aligned = tmp_path / "Image" / "aligned"
    face(aligned / "train_00001_aligned.jpg", value=1)
    face(aligned / "train_00002_aligned.jpg", value=2)
    corrupt(aligned / "train_00003_aligned.jpg")
    face(aligned / "test_0001_aligned.jpg", value=4)
    face(tmp_path / "Image" / "original" / "train_00001.jpg", size=(60, 50))
    src = build("rafdb", root=str(tmp_path))
    recs = list(src.records())
    assert [r.expression for r in recs] == ["sad", "surprise"]  # labels 5, 1 (1-based rafdb7)
    assert [r.attributes["file"] for r in recs] == ["train_00001.jpg", "train_00002.jpg"]
    assert len(src.skipped) == 2  # the corrupt image and the malformed label line
    assert any("train_00003_aligned.jpg" in s for s in src.skipped)
    assert [r.expression for r in build("rafdb", root=str(tmp_path), split="test").records()] == ["neutral"]
    assert len(list(build("rafdb", root=str(tmp_path), split="all").records())) == 3
    src = build("rafdb", root=str(tmp_path), aligned=False)
    recs = list(src.records())
    assert len(recs) == 1 and recs[0].image.size == (60, 50) and len(src.skipped) == 3  # originals 2, 3 missing


def test_rafdb_without_label_file_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="list_patition_label.txt"):
        list(build("rafdb", root=str(tmp_path)).records())


# ---------------------------------------------------------------- FER2013


def test_fer2013_csv(tmp_path):
    pix = lambda v: " ".join([str(v)] * 48 * 48)  # noqa: E731
    with open(tmp_path / "fer2013.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        w.writerow([0, pix(10), "Training"])
        w.writerow([3, pix(200), "Training"])
        w.writerow([6, "1 2 3", "Training"])  # wrong pixel count: skipped
        w.writerow([2, pix(300), "Training"])  # out of range: skipped
        w.writerow([5, pix(50), "PublicTest"])
        w.writerow([4, pix(60), "PrivateTest"])
    src = build("fer2013-csv", root=str(tmp_path))
    recs = list(src.records())
    assert [r.expression for r in recs] == ["anger", "happy"]
    assert recs[0].image.size == (48, 48) and recs[0].image.mode == "RGB"
    assert np.asarray(recs[1].image)[0, 0].tolist() == [200, 200, 200]
    assert src.skipped == ["fer2013.csv:row 4 (bad pixels: 3 values, expected 2304)", "fer2013.csv:row 5 (bad pixels: values outside 0..255)"]
    assert [r.expression for r in build("fer2013-csv", root=str(tmp_path), split="val").records()] == ["surprise"]
    assert len(list(build("fer2013-csv", root=str(tmp_path / "fer2013.csv"), split="all").records())) == 4
