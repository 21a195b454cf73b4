"""Issue 22: no silent data errors, no raw tracebacks, one writer per output.

Each case of the issue's table: the bad input either works correctly or fails with one clear
line naming the culprit; nothing is silently changed, duplicated or dropped.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from synfer.commands.cli import main
from synfer.engine.dataset import METADATA, DatasetError, read_metadata

HERE = Path(__file__).parent


def face(path: Path, size=(40, 40), value=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(value).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def one_error(res, *words):
    """Exit 1, no traceback, a short message holding every word."""
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output, res.output
    assert "Error: " in res.output, res.output
    assert len(res.output[res.output.index("Error: "):].strip().splitlines()) <= 2, res.output  # progress bars before it aside
    for w in words:
        assert w in res.output, (w, res.output)


def fetext_recipe(tmp_path, sources, out="fetext", **kw) -> Path:
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / out), "size": 32, "batch_size": 2, "au_detector": None,
                                    "sources": sources, **kw}))
    return path


# ---------------------------------------------------------------- 1. stable record identity


def _keys(out: Path) -> list[str]:
    return [f"{r['source']}:{r['attributes']['file']}" for r in read_metadata(out)]


def test_fetext_resume_after_the_source_changed_keeps_every_record_once(tmp_path):
    """Build, then fix a bad file, add one and remove one: every file's record appears once, none is
    rewritten, and the summary says what changed (today: c.png written twice, b.png never)."""
    root = tmp_path / "faces"
    for name, v in (("a", 1), ("c", 3), ("d", 4)):
        face(root / "happy" / f"{name}.png", value=v)
    (root / "happy" / "b.png").write_bytes(b"not a png")  # unreadable in the first build
    recipe = fetext_recipe(tmp_path, [{"plugin": "imagefolder", "root": str(root)}])
    res = cli("fetext", "build", recipe, "--no-progress")
    assert res.exit_code == 0, res.output
    out = tmp_path / "fetext"
    assert _keys(out) == ["imagefolder:happy/a.png", "imagefolder:happy/c.png", "imagefolder:happy/d.png"]
    before = {r["attributes"]["file"]: (r["index"], (out / r["file_name"]).read_bytes()) for r in read_metadata(out)}

    face(root / "happy" / "b.png", value=2)  # fixed
    face(root / "happy" / "e.png", value=5)  # added
    (root / "happy" / "d.png").unlink()  # removed
    res = cli("fetext", "build", recipe, "--no-progress")
    assert res.exit_code == 0, res.output
    keys = _keys(out)
    assert sorted(keys) == [f"imagefolder:happy/{n}.png" for n in "abcde"] and len(keys) == len(set(keys)) == 5
    rows = {r["attributes"]["file"]: r for r in read_metadata(out)}
    for file, (index, data) in before.items():  # already there: same index, same bytes
        assert rows[file]["index"] == index and (out / rows[file]["file_name"]).read_bytes() == data
    assert rows["happy/b.png"]["index"] == 3 and rows["happy/e.png"]["index"] == 4  # the next free indices
    assert len(list((out / "images").glob("*.png"))) == 5
    assert "(2 written now, 2 already there)" in res.output
    assert "source changed since the last build: 1 record(s) new among those already there" in res.output
    assert "1 record(s) on disk no longer given by the sources" in res.output
    summary = json.loads((out / "fetext_summary.json").read_text())
    assert summary["source_changed"] == {"inserted": 1, "gone": 1}


def test_two_sources_under_one_tag_are_refused_up_front(tmp_path):
    """Records are keyed by source tag and file: two folders under one tag would collide, so validate says so."""
    a, b = tmp_path / "a", tmp_path / "b"
    face(a / "sad" / "x.png")
    face(b / "sad" / "x.png", value=1)
    recipe = fetext_recipe(tmp_path, [{"plugin": "imagefolder", "root": str(a)}, {"plugin": "imagefolder", "root": str(b)}])
    res = cli("fetext", "validate", recipe)
    assert res.exit_code == 1 and "sources.1: writes source 'imagefolder' like sources.0" in res.output and "set `tag:`" in res.output
    res = cli("fetext", "build", recipe, "sources.1.tag=b", "--no-progress")
    assert res.exit_code == 0, res.output
    assert sorted(_keys(tmp_path / "fetext")) == ["b:sad/x.png", "imagefolder:sad/x.png"]


def test_procedural_fetext_is_unchanged_by_the_keys(tmp_path):
    """The default procedural build keeps its record order and file names (index = stream position),
    and a rerun resumes every record."""
    pytest.importorskip("synfer_plugins.procedural")
    recipe = HERE.parent / "recipes" / "fetext-procedural.yaml"
    args = ["fetext", "build", recipe, f"output={tmp_path / 'p'}", "sources.0.num_images=6", "batch_size=4", "--no-progress"]
    assert cli(*args).exit_code == 0
    rows = read_metadata(tmp_path / "p")
    assert [r["index"] for r in rows] == list(range(6)) and [r["file_name"] for r in rows] == [f"images/{i:08d}.png" for i in range(6)]
    assert "key" not in rows[0]  # no new column: the metadata of the shipped build is unchanged
    res = cli(*args)
    assert "(0 written now, 6 already there)" in res.output and "source changed" not in res.output


# ---------------------------------------------------------------- 2. inputs read correctly or refused


def test_16_and_32_bit_and_float_images_are_scaled_not_saturated(tmp_path):
    from synfer_plugins.sources import load_image

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")  # a 16-bit grey PNG
    Image.fromarray((ramp * 65535).astype(np.int32), "I").save(tmp_path / "g32.tif")
    Image.fromarray(ramp.astype(np.float32), "F").save(tmp_path / "f.tif")
    for name in ("g16.png", "g32.tif", "f.tif"):
        im, why = load_image(tmp_path / name)
        assert why is None and im.mode == "RGB"
        a = np.asarray(im)[..., 0].astype(float)
        assert abs(a.mean() - 127.5) < 2 and a.min() == 0 and a.max() == 255, (name, a.mean())  # today: 99.6% white
        assert (a >= 255).mean() < 0.01


def test_tiny_images_are_skipped_with_the_reason_and_min_size_is_configurable(tmp_path):
    root = tmp_path / "faces"
    face(root / "happy" / "dot.png", size=(1, 1))
    face(root / "happy" / "small.png", size=(20, 20))
    face(root / "happy" / "ok.png", size=(40, 40))
    res = cli("fetext", "build", fetext_recipe(tmp_path, [{"plugin": "imagefolder", "root": str(root)}]), "--no-progress")
    assert res.exit_code == 0, res.output
    assert [r["attributes"]["file"] for r in read_metadata(tmp_path / "fetext")] == ["happy/ok.png", "happy/small.png"]
    assert "skipped 1 file(s) or row(s) (1 too small)" in res.output and "dot.png (too small: 1x1, a side below min_size 16)" in res.output
    res = cli("fetext", "build", fetext_recipe(tmp_path, [{"plugin": "imagefolder", "root": str(root), "min_size": 32}], out="f2"), "--no-progress")
    assert [r["attributes"]["file"] for r in read_metadata(tmp_path / "f2")] == ["happy/ok.png"]
    assert json.loads((tmp_path / "f2" / "fetext_summary.json").read_text())["skipped_reasons"] == {"too small": 2}


def _fer(path: Path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


PIX = " ".join(["100"] * 48 * 48)


def test_fer2013_label_outside_the_space_is_refused_with_its_row(tmp_path):
    from synfer_plugins.sources import Fer2013Source

    _fer(tmp_path / "fer2013.csv", ["emotion", "pixels", "Usage"], [[3, PIX, "Training"], [-1, PIX, "Training"], [7, PIX, "Training"]])
    src = Fer2013Source(Fer2013Source.Config(root=str(tmp_path)))
    assert [r.expression for r in src.records()] == ["happy"]  # -1 is not neutral (it indexed from the end)
    assert src.skipped == ["fer2013.csv:row 3 (bad emotion: -1, expected 0..6)", "fer2013.csv:row 4 (bad emotion: 7, expected 0..6)"]


@pytest.mark.parametrize("case,expect", [
    ("no-usage", ["fer2013.csv has no column Usage", "expected FER2013's CSV with the header 'emotion,pixels,Usage'", "split: all"]),
    ("empty", ["fer2013.csv is empty", "expected FER2013's CSV"]),
    ("header-only", ["has a header but no rows"]),
    ("other-split", ["no row of", "has Usage 'Training'", "found PublicTest 1", "set split:"]),
])
def test_fer2013_schema_is_checked_up_front(tmp_path, case, expect):
    data = tmp_path / "fer"
    data.mkdir()
    if case == "no-usage":
        _fer(data / "fer2013.csv", ["emotion", "pixels"], [[3, PIX]])
    elif case == "empty":
        (data / "fer2013.csv").write_text("")
    elif case == "header-only":
        _fer(data / "fer2013.csv", ["emotion", "pixels", "Usage"], [])
    else:
        _fer(data / "fer2013.csv", ["emotion", "pixels", "Usage"], [[3, PIX, "PublicTest"]])
    res = cli("fetext", "build", fetext_recipe(tmp_path, [{"plugin": "fer2013-csv", "root": str(data)}]), "--no-progress")
    one_error(res, "fer2013-csv source", *expect)


@pytest.mark.parametrize("case,expect", [
    ("no-path-column", ["training.csv has no column subDirectory_filePath", "expected AffectNet's CSV with columns"]),
    ("binary", ["training.csv is a binary file, not a CSV", "expected AffectNet's CSV"]),
    ("no-face-box", ["has no column face_x, face_y, face_width, face_height", "crop_face: false"]),
])
def test_affectnet_schema_is_checked_up_front(tmp_path, case, expect):
    data = tmp_path / "affectnet"
    data.mkdir()
    if case == "no-path-column":
        _fer(data / "training.csv", ["path", "expression"], [["1/a.jpg", 1]])
    elif case == "binary":
        (data / "training.csv").write_bytes(bytes(range(256)) * 8)
    else:
        _fer(data / "training.csv", ["subDirectory_filePath", "expression"], [["1/a.jpg", 1]])
    res = cli("fetext", "build", fetext_recipe(tmp_path, [{"plugin": "affectnet-csv", "root": str(data)}]), "--no-progress")
    one_error(res, "affectnet-csv source", *expect)


def test_rafdb_line_without_extension_is_skipped_with_its_line(tmp_path):
    from synfer_plugins.sources import RafDBSource

    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 5\ntrain_00002 1\ntrain_00003.jpg 4\n" * 1)
    for n in (1, 3):
        face(tmp_path / "Image" / "aligned" / f"train_0000{n}_aligned.jpg", value=n)
    src = RafDBSource(RafDBSource.Config(root=str(tmp_path)))
    assert [r.attributes["file"] for r in src.records()] == ["train_00001.jpg", "train_00003.jpg"]  # not a ValueError after row 1
    assert src.skipped == ["list_patition_label.txt:2 (malformed line: 'train_00002 1', expected '<name>.jpg <label 1..7>')"]
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text("train_00001 5\ntrain_00002 1\n")
    with pytest.raises(DatasetError, match=r"has no usable line \(the first is 'train_00001 5'\); expected lines '<name>.jpg <label 1..7>'"):
        list(RafDBSource(RafDBSource.Config(root=str(tmp_path))).records())


# ---------------------------------------------------------------- 4. one clean error path in the CLI


def _run_recipe_file(tmp_path, out, **kw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"seed": 1, "num_images": 4, "output": str(out), "grid": False, "report": False,
                                    "generator": {"plugin": "dummy", "batch_size": 2}, "experts": [{"plugin": "dummy-expert"}],
                                    "guidance_classifier": None, "calibrator": None, "evaluators": [], **kw}))
    return path


@pytest.fixture
def dummy_env(monkeypatch):
    """`synfer` in-process with the dummy test plugins registered."""
    import dummy_plugins

    from synfer.engine import registry as plugins

    reg = plugins.Registry()
    reg.load_entrypoints()
    reg.add(dummy_plugins, provider="tests")
    monkeypatch.setattr(plugins, "_REGISTRY", reg)
    monkeypatch.delenv("SYNFER_VERBOSITY", raising=False)
    return reg


@pytest.mark.parametrize("err,expect", [
    (OSError(errno.ENOSPC, "No space left on device"), ["No space left on device:", "free space there and rerun the same command"]),
    (OSError(errno.EROFS, "Read-only file system"), ["Read-only file system:", "choose another output folder"]),
    (PermissionError(errno.EACCES, "Permission denied"), ["Permission denied:", "choose a folder you can write"]),
])
def test_os_errors_are_one_message_and_v_shows_the_traceback(tmp_path, dummy_env, monkeypatch, err, expect):
    from synfer.engine import dataset

    out = tmp_path / "out"
    recipe = _run_recipe_file(tmp_path, out)

    def broken(self, index, image, sync):
        err.filename = str(self.root / dataset.image_name(index))
        raise err

    monkeypatch.setattr(dataset.DatasetWriter, "_put_image", broken)
    res = cli("run", recipe)
    one_error(res, *expect, str(out / "images" / "00000000.png"), "what is already written stays intact", "synfer -v")
    assert not (out / ".synfer.lock").exists()  # the lock goes with the failed run
    res = cli("-v", "run", recipe)
    assert res.exit_code == 1 and isinstance(res.exception, OSError)  # -v: the exception (and its traceback) comes through


def test_output_that_is_a_file_is_one_message(tmp_path, dummy_env):
    (tmp_path / "out").write_text("not a folder")
    res = cli("run", _run_recipe_file(tmp_path, tmp_path / "out"))
    one_error(res, str(tmp_path / "out"))  # validate (issue 22 item 3) or the run's own OSError path, one message either way
    assert (tmp_path / "out").read_text() == "not a folder"


def test_plugin_error_names_the_plugin(tmp_path, dummy_env):
    res = cli("run", _run_recipe_file(tmp_path, tmp_path / "out", generator={"plugin": "dummy", "steps": 0}))
    one_error(res, "generator 'dummy' (from tests) failed in generate()", "ValueError: steps must be > 0", "synfer -v")


def test_quiet_and_verbose_are_global_options(tmp_path, dummy_env):
    from synfer.engine.logs import verbosity

    res = cli("-q", "run", _run_recipe_file(tmp_path, tmp_path / "out"))
    assert res.exit_code == 0 and verbosity() == -1 and os.environ.get("TQDM_DISABLE") == "1"
    os.environ.pop("TQDM_DISABLE")
    assert cli("labels").exit_code == 0 and verbosity() == 0


# ---------------------------------------------------------------- 5. one writer per output


def test_a_second_writer_is_stopped_and_a_stale_lock_taken_over(tmp_path, dummy_env):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    recipe = _run_recipe_file(tmp_path, out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": sleeper.pid, "host": socket.gethostname(), "started": None, "time": time.time(), "command": "synfer run", "run": ""}
        (out / ".synfer.lock").write_text(json.dumps(lock))
        res = cli("run", recipe)
        one_error(res, f"{out} is being written by PID {sleeper.pid} on {socket.gethostname()}", "use another output folder",
                  f"delete {out / '.synfer.lock'}")
        assert not (out / METADATA).exists()  # nothing written
    finally:
        sleeper.kill()
        sleeper.wait()
    res = cli("run", recipe)  # the holder is gone: stale, taken over with a note
    assert res.exit_code == 0, res.output
    assert "took over the stale lock of PID" in res.output and len(read_metadata(out)) == 4
    assert not (out / ".synfer.lock").exists()


def test_fetext_build_into_a_folder_another_process_writes_is_stopped(tmp_path):
    import socket

    root = tmp_path / "faces"
    face(root / "happy" / "a.png")
    out = tmp_path / "fetext"
    out.mkdir()
    lock = {"pid": os.getppid(), "host": socket.gethostname(), "started": None, "time": time.time(), "command": "synfer fetext build", "run": ""}
    (out / ".synfer.lock").write_text(json.dumps(lock))
    res = cli("fetext", "build", fetext_recipe(tmp_path, [{"plugin": "imagefolder", "root": str(root)}]), "--no-progress")
    one_error(res, f"{out} is being written by PID {os.getppid()}", "(synfer fetext build)")
    assert not (out / METADATA).exists()


@pytest.mark.slow
def test_two_concurrent_runs_one_wins(tmp_path):
    """Two real `synfer run` processes into one folder: one writes, the other stops at once with the lock message."""
    from conftest import make_dist, subprocess_env

    site = make_dist(tmp_path / "site", "synfer-dummy", {"dummy": "dummy_plugins"})
    env = {**subprocess_env(HERE, site), "OMP_NUM_THREADS": "1"}
    env.pop("SYNFER_CRASH_AT", None)
    # the first holds the lock for ~12 s of sleeping batches: ample time for the second to start and meet it
    recipe = _run_recipe_file(tmp_path, tmp_path / "out", num_images=8, generator={"plugin": "dummy", "batch_size": 1, "delay": 1.5})
    cmd = [sys.executable, "-m", "synfer", "run", str(recipe)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        if (tmp_path / "out" / ".synfer.lock").exists():
            break
        time.sleep(0.1)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.wait(timeout=120) == 0
    assert second.returncode == 1 and "is being written by PID" in second.stderr and "Traceback" not in second.stderr
    rows = read_metadata(tmp_path / "out")
    assert [r["index"] for r in rows] == list(range(8))


def test_torchrun_ranks_share_the_lock(tmp_path, monkeypatch):
    from synfer.engine.lock import LockError, OutputLock

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    rank1 = OutputLock(tmp_path, "synfer run", rank=1).acquire()  # rank 1 arrives first and creates it
    rank0 = OutputLock(tmp_path, "synfer run", rank=0).acquire()  # same launch: shared
    rank1.__exit__(None, None, None)
    assert (tmp_path / ".synfer.lock").exists()  # rank 1 leaves: still held for rank 0
    monkeypatch.setenv("MASTER_PORT", "29556")  # another launch into the same folder
    with pytest.raises(LockError, match="is being written by PID"):
        OutputLock(tmp_path, "synfer run", rank=0).acquire()
    monkeypatch.setenv("MASTER_PORT", "29555")
    rank0.__exit__(None, None, None)
    assert not (tmp_path / ".synfer.lock").exists()


def test_run_into_a_fetext_folder_is_refused(tmp_path, dummy_env):
    root = tmp_path / "faces"
    face(root / "happy" / "a.png")
    assert cli("fetext", "build", fetext_recipe(tmp_path, [{"plugin": "imagefolder", "root": str(root)}]), "--no-progress").exit_code == 0
    before = (tmp_path / "fetext" / METADATA).read_bytes()
    res = cli("run", _run_recipe_file(tmp_path, tmp_path / "fetext"))
    one_error(res, "labelled images (a FEText or real set), not the output of 'synfer run'", "pick another output=")
    assert (tmp_path / "fetext" / METADATA).read_bytes() == before
    assert cli("run", _run_recipe_file(tmp_path, tmp_path / "gen")).exit_code == 0
    res = cli("fetext", "build", fetext_recipe(tmp_path, [{"plugin": "imagefolder", "root": str(root)}], out="gen"), "--no-progress")
    one_error(res, "holds generated samples of `synfer run`")


@pytest.mark.parametrize("damage", ["missing", "truncated-image", "torn-line"])
def test_eval_and_calibrate_on_a_damaged_dataset_name_the_file(tmp_path, dummy_env, damage):
    out = tmp_path / "out"
    recipe = _run_recipe_file(tmp_path, out)
    assert cli("run", recipe).exit_code == 0
    rows = read_metadata(out)
    victim = out / rows[-1]["file_name"]
    if damage == "missing":
        victim.unlink()
        expect = ["1 file(s) listed in", "are missing", rows[-1]["file_name"]]
    elif damage == "truncated-image":
        victim = out / next(r for r in rows if r["kept"])["file_name"]  # evaluators read kept images
        victim.write_bytes(victim.read_bytes()[:60])
        expect = [str(victim), "cannot read the image"]
    else:
        meta = out / METADATA
        meta.write_bytes(meta.read_bytes()[:-20])  # the last line cut mid-way
        expect = [f"{meta}: line 4 is cut off", "rerun the command"]
    one_error(cli("eval", out, "--evaluators", "fid", "--reference", out, "-o", "fid.extractor=pixels"), *expect)
    one_error(cli("calibrate", out, recipe), *expect)


# ---------------------------------------------------------------- 6. FID with one image; a huge plan


def test_one_image_skips_fid_with_a_note_and_still_writes_metrics_and_report(tmp_path, dummy_env):
    pytest.importorskip("torch")
    ref = tmp_path / "ref"
    assert cli("run", _run_recipe_file(tmp_path, ref, num_images=4)).exit_code == 0
    out = tmp_path / "one"
    recipe = _run_recipe_file(tmp_path, out, num_images=1, report=True,
                              evaluators=[{"plugin": "fid", "reference": str(ref), "extractor": "pixels"}, {"plugin": "dummy-count"}])
    res = cli("run", recipe)
    assert res.exit_code == 0, res.output
    assert "[fid] skipped: FID needs at least 2 images per set, got 1 generated (kept) and 4 reference" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fid_images"] == 1.0 and "fid" not in metrics and metrics["count"] == 1.0
    assert (out / "report.html").stat().st_size > 0  # today: no metrics, no report


def test_a_huge_plan_is_built_lazily_with_progress_from_the_start(tmp_path, dummy_env):
    """num_images far beyond memory: the first batch is generated at once (today the whole plan is built first)."""
    from synfer.engine.pipeline import iter_plan, run_recipe
    from synfer.engine.recipe import load_recipe

    class Enough(Exception):
        pass

    recipe = load_recipe(_run_recipe_file(tmp_path, tmp_path / "big", num_images=10**7), registry=dummy_env)
    gen = dummy_env.get("generator", "dummy")
    t0 = time.time()
    calls = []

    def first_batch(self, requests, guidance=None):
        calls.append((time.time() - t0, [r.index for r in requests]))
        raise Enough

    orig = gen.generate
    gen.generate = first_batch
    try:
        from synfer.contract.contracts import PluginCallError

        with pytest.raises(PluginCallError) as err:  # a plugin's exception comes out naming the plugin, its cause chained
            run_recipe(recipe, registry=dummy_env, progress=False)
        assert isinstance(err.value.__cause__, Enough)
    finally:
        gen.generate = orig
    assert calls[0][1] == [0, 1] and calls[0][0] < 5.0, calls  # an eager 10**7 plan takes minutes and gigabytes
    first = next(iter_plan(recipe, [10**7 - 1]))
    assert first.index == 10**7 - 1 and first.expression
    assert not (tmp_path / "big" / ".synfer.lock").exists()
