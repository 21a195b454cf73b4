"""One row schema (issue 20, item 4): FEText rows (label = index, expression = name) and generated
rows (label = name) read through `DatasetRow` / `row_label`; report and evaluators work on both."""
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from synfer.engine.dataset import DatasetError, DatasetRow, DatasetWriter, read_metadata, row_label

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def fetext(tmp_path_factory):
    """A small real FEText build: 24 procedural faces, `label` stored as an index."""
    from synfer.commands.fetext import build_fetext, load_fetext_recipe

    out = tmp_path_factory.mktemp("fetext") / "set"
    recipe = load_fetext_recipe(ROOT / "recipes" / "fetext-procedural.yaml", [f"output={out}", "sources.0.num_images=24", "batch_size=8"])
    build_fetext(recipe, progress=False)
    return out


def test_row_label_reads_both_kinds():
    assert row_label({"file_name": "a", "label": 3, "expression": "Sad"}) == "sad"  # FEText: index + name
    assert row_label({"file_name": "a", "label": 0, "expression": "neutral"}) == "neutral"  # index 0 is not "no label"
    assert row_label({"file_name": "a", "label": "Anger", "preassigned_label": "fear"}) == "anger"  # generated: final label
    assert row_label({"file_name": "a"}) is None and row_label({"file_name": "a", "label": None, "expression": None}) is None
    assert row_label(DatasetRow(file_name="a", label=2, expression="happy")) == "happy"
    with pytest.raises(DatasetError, match="index label .* no 'expression'"):
        row_label({"file_name": "x.png", "label": 4})


def test_fetext_rows_parse_and_keep_their_on_disk_form(fetext):
    rows = read_metadata(fetext)
    assert len(rows) == 24
    assert all(isinstance(r["label"], int) and isinstance(r["expression"], str) for r in rows)  # format unchanged
    parsed = [DatasetRow.model_validate(r) for r in rows]
    assert all(not p.generated and p.kept for p in parsed)
    assert [row_label(r) for r in rows] == [r["expression"] for r in rows]


def test_a_bad_row_names_its_line(tmp_path):
    w = DatasetWriter(tmp_path)
    w.write(0, Image.new("RGB", (4, 4)), {"expression": "happy"})
    with open(tmp_path / "metadata.jsonl", "a") as f:
        f.write('{"index": 1, "label": "happy"}\n')  # no file_name
    with pytest.raises(DatasetError, match=r"row 2 is not a synfer dataset row \(file_name: Field required\)"):
        read_metadata(tmp_path, verify=False)


def test_report_on_a_fetext_folder(fetext):
    from synfer.commands.report import report_cli

    result = CliRunner().invoke(report_cli, [str(fetext)])
    assert result.exit_code == 0, result.output
    page = (fetext / "report.html").read_text()
    assert "24 images, 24 kept" in page and "no calibration: a labelled (real/FEText) set" in page
    classes = {r["expression"] for r in read_metadata(fetext)}
    assert all(f"class='name'>{c}</span>" in page for c in classes)


def test_fer_accuracy_on_a_fetext_folder(fetext):
    ev = pytest.importorskip("synfer_plugins.evaluators")
    out = ev.FERAccuracy(ev.FERAccuracy.Config()).evaluate(fetext)
    assert out["fer_accuracy_n"] == 24.0
    # the oracle judges the world it was trained on: measured 1.0 on these 24 faces
    assert out["fer_accuracy"] >= 0.9, out
    labels = {r["expression"] for r in read_metadata(fetext)}
    assert {k.removeprefix("fer_accuracy_") for k in out if k not in ("fer_accuracy", "fer_accuracy_n")} == labels


def test_calibrate_a_labelled_folder(tmp_path, registry):
    """A FEText-style folder (index labels) calibrates: its expression becomes the preassigned label."""
    import yaml

    from synfer import labels as L
    from synfer.commands.calibrate import calibrate_dataset
    from synfer.engine.recipe import load_recipe

    space = L.label_space("affectnet8")
    w = DatasetWriter(tmp_path / "set")
    names = ["happy", "sad", "neutral", "anger"]
    for i, e in enumerate(names):
        w.write(i, Image.new("RGB", (8, 8), (40 * i,) * 3), {"expression": e, "label": space.index(e)})
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"output": str(tmp_path / "unused"), "generator": {"plugin": "dummy"}}))
    counts = calibrate_dataset(tmp_path / "set", load_recipe(p, registry=registry), registry=registry, progress=False)
    rows = read_metadata(tmp_path / "set")
    assert [r["preassigned_label"] for r in rows] == names and [r["label"] for r in rows] == names  # no experts: kept as is
    assert [row_label(r) for r in rows] == names and {c: counts[c]["total"] for c in counts} == {e: 1 for e in names}
