"""`synfer report`: a self-contained report.html with every section; rendered by headless chromium when present."""
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from synfer.engine.dataset import DatasetWriter
from synfer.commands.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ("summary", "grid", "changed", "calibration", "confusion", "metrics", "downstream")


def generated_set(root, downstream=True):
    rng = np.random.default_rng(0)
    w = DatasetWriter(root)
    pre = ["happy", "happy", "sad", "sad", "surprise", "happy", "sad", "surprise"]
    final = ["happy", "sad", "sad", "sad", "surprise", "happy", "happy", "surprise"]
    kept = [True, True, True, False, True, True, True, True]
    for i, (p, f, k) in enumerate(zip(pre, final, kept)):
        w.write(i, Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                {"preassigned_label": p, "label": f, "kept": k, "aus": {}})
    (root / "metrics.json").write_text(json.dumps({"fid": 12.5, "fer_accuracy": 0.8, "au_f1": 0.6, "diversity": 0.3,
                                                   "label_quality": 0.9, "fer_accuracy_happy": 1.0}))
    if downstream:
        from synfer.commands.downstream import plot_downstream, summarize

        runs = [{"setting": s, "scale": k, "seed": 0, "train_images": 10, "accuracy": a, "uar": a}
                for s, k, a in [("real", 0.0, 0.5), ("synthetic", 1, 0.4), ("synthetic", 2, 0.45), ("real+synthetic", 1, 0.6), ("real+synthetic", 2, 0.65)]]
        result = {"config": {"real_per_class": 5, "seeds": [0]}, "runs": runs, "summary": summarize(runs), "seconds": 1.0}
        (root / "downstream.json").write_text(json.dumps(result))
        plot_downstream(result, root / "downstream.png")
    return root


def test_report_has_every_section(tmp_path):
    root = generated_set(tmp_path / "ds")
    path = write_report(root)
    assert path == root / "report.html"
    page = path.read_text()
    for s in SECTIONS:
        assert f"id='{s}'" in page, s
    assert page.count("data:image/png;base64,") >= 7 + 2  # 7 kept sample images + confusion + downstream
    assert "src='http" not in page and "src='file" not in page  # self-contained
    assert "recomputed from metadata" in page  # no calibration.json: counted from rows
    assert "fer_accuracy" in page and "12.5000" in page and "oracle-cnn" in page
    assert "3 dropped" not in page and "1 dropped" in page
    assert "real+synthetic" in page
    changed = page[page.index("id='changed'"):page.index("id='calibration'")]
    assert "Relabelled (2)" in changed and "Dropped (1)" in changed  # happy -> sad, sad -> happy; the one sad dropped
    assert changed.count("data:image/png;base64,") == 3 and "sad -&gt; dropped" in changed and "happy -&gt; sad" in changed


def test_report_prefers_calibration_json_and_finds_downstream_elsewhere(tmp_path):
    root = generated_set(tmp_path / "ds", downstream=False)
    (root / "calibration.json").write_text(json.dumps({"happy": {"total": 3, "kept": 3, "relabelled": 1, "dropped": 0}}))
    other = generated_set(tmp_path / "other")
    (other / "downstream.png").unlink()  # only the json: the plot is drawn from it
    page = write_report(root, downstream=other / "downstream.json").read_text()
    assert "source: calibration.json" in page and "real+synthetic" in page
    bare = write_report(generated_set(tmp_path / "bare", downstream=False)).read_text()
    assert "synfer benchmark downstream" in bare  # says how to get the missing section


def test_report_of_a_real_set_and_cli(tmp_path):
    from click.testing import CliRunner

    from synfer.commands.report import report_cli

    w = DatasetWriter(tmp_path / "real")
    for i, e in enumerate(["happy", "sad", "happy"]):
        w.write(i, Image.new("RGB", (16, 16), (i * 60, 0, 0)), {"expression": e})
    res = CliRunner().invoke(report_cli, [str(tmp_path / "real"), "--per-class", "1"])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "real" / "report.html").read_text()
    assert "no preassigned labels" in page and "no metrics.json" in page
    assert page.count("data:image/png;base64,") == 2  # one image per class


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
@pytest.mark.slow  # subprocess runs
def test_report_renders_in_headless_chromium(tmp_path):
    root = generated_set(tmp_path / "ds")
    path = write_report(root)
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000", path.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=90)
    assert shot.exists(), "chromium wrote no screenshot"
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("L"))
    assert im.size == (1200, 2000)
    assert arr.std() > 10  # something was drawn, not a blank page
    assert (arr[:400] < 128).mean() > 0.005  # heading and sample images near the top
