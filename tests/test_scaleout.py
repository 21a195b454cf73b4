"""Scale-out and crash safety: torchrun shards equal one process; kill -9 anywhere, rerun, same files."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import HERE, make_dist, subprocess_env

from synfer.dataset import METADATA, PARTS, DatasetWriter, merge, part_name, read_metadata


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of a run (the dataset folder and the grid beside it), by relative path."""
    files = {p.relative_to(out.parent).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    grid = out.parent / f"{out.name}-grid.png"
    if grid.exists():
        files[grid.name] = grid.read_bytes()
    return files


def _env(tmp_path, **extra):
    site = tmp_path / "site"
    if not site.exists():
        make_dist(site, "synfer-dummy", {"dummy": "dummy_plugins"})
    env = subprocess_env(HERE, site)
    env.update({"OMP_NUM_THREADS": "1", **extra})
    env.pop("SYNFER_CRASH_AT", None)
    env.update(extra)
    return env


def _write_recipe(path: Path, out: Path, **data) -> Path:
    base = {"seed": 5, "num_images": 12, "output": str(out), "grid": True, "report": False,
            "generator": {"plugin": "dummy", "batch_size": 4},
            "experts": [{"plugin": "dummy-expert", "weight": 1.0}, {"plugin": "tiny-cnn", "weight": 0.5}],
            "vote": {"rule": "paper", "threshold": 0.6}, "evaluators": [{"plugin": "dummy-count"}]}
    base.update(data)
    path.write_text(yaml.safe_dump(base))
    return path


def _run(recipe: Path, env, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synfer", "run", str(recipe), *extra], env=env, capture_output=True, text=True, timeout=300)


POINTS = ["generate:2", "calibrate:2", "write:2", "merge", "merged"]


@pytest.mark.slow  # subprocess runs
def test_kill9_at_each_point_then_rerun_gives_identical_files(tmp_path):
    ref_out = tmp_path / "ref" / "ds"
    ref_out.parent.mkdir()
    done = _run(_write_recipe(tmp_path / "ref.yaml", ref_out), _env(tmp_path))
    assert done.returncode == 0, done.stderr
    ref = snapshot(ref_out)
    assert len([k for k in ref if k.endswith(".png") and "/images/" in k]) == 12
    for point in POINTS:
        out = tmp_path / point.replace(":", "-") / "ds"
        out.parent.mkdir()
        recipe = _write_recipe(tmp_path / f"{point.replace(':', '-')}.yaml", out)
        killed = _run(recipe, _env(tmp_path, SYNFER_CRASH_AT=point))
        assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
        resumed = _run(recipe, _env(tmp_path))
        assert resumed.returncode == 0, (point, resumed.stderr[-2000:])
        got = snapshot(out)
        assert sorted(got) == sorted(ref), (point, set(got) ^ set(ref))
        assert all(got[k] == ref[k] for k in ref), (point, [k for k in ref if got[k] != ref[k]])


@pytest.mark.slow  # subprocess runs
def test_torchrun_two_processes_equal_one(tmp_path):
    """`torchrun --nproc-per-node 2 -m synfer run` (gloo) writes the same bytes as one process:
    the shipped tiny model with semantic guidance, FERAnno and an expert vote. Chunks of 3 over 8
    samples: rank 0 runs chunks 0 and 2 (the short one, padded), rank 1 chunk 1."""
    data = {"generator": {"plugin": "sd", "steps": 4, "chunk": 3, "batch_size": 3, "layout": {"enabled": False}},
            "guidance_classifier": {"plugin": "tiny-cnn"}, "calibrator": {"plugin": "feranno"},
            "experts": [{"plugin": "tiny-cnn", "weight": 1.0}], "num_images": 8}
    one, two = tmp_path / "one" / "ds", tmp_path / "two" / "ds"
    for d in (one, two):
        d.parent.mkdir()
    r1 = _run(_write_recipe(tmp_path / "one.yaml", one, **data), _env(tmp_path))
    assert r1.returncode == 0, r1.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "synfer", "run",
           str(_write_recipe(tmp_path / "two.yaml", two, **data))]
    r2 = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = snapshot(one), snapshot(two)
    assert len([k for k in a if "/images/" in k]) == 8
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert not (two / PARTS).exists()


@pytest.mark.slow  # subprocess runs
def test_parts_merge_idempotent_and_resume_across_world_sizes(tmp_path):
    from PIL import Image

    for rank in (0, 1):  # two ranks of a killed run: rank 1 wrote a torn line and a stray temp image
        w = DatasetWriter(tmp_path, part=part_name(rank))
        for i in range(rank, 6, 2):
            w.write(i, Image.new("RGB", (4, 4), (i, i, i)), {"label": "happy"})
    with open(tmp_path / part_name(1), "a") as f:
        f.write('{"file_name": "images/00000007.png", "ind')
    (tmp_path / "images" / ".00000007.png.tmp").write_bytes(b"half")
    assert DatasetWriter(tmp_path).done == {0, 1, 2, 3, 4, 5}  # a 1-process rerun sees every rank's work
    assert not (tmp_path / "images" / ".00000007.png.tmp").exists()
    rows = merge(tmp_path)
    assert [r["index"] for r in rows] == list(range(6))
    assert not (tmp_path / PARTS).exists()
    first = (tmp_path / METADATA).read_bytes()
    merge(tmp_path)
    assert (tmp_path / METADATA).read_bytes() == first
    assert [r["index"] for r in read_metadata(tmp_path)] == list(range(6))


@pytest.mark.parametrize("spec,hits", [("write:2", 2), ("other", 0)])
def test_crash_point_counts_only_its_name(spec, hits):
    code = ("from synfer.faults import crash_point\n"
            "for i in range(3):\n    crash_point('write')\n    print(i, flush=True)\n")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SYNFER_CRASH_AT": spec}, capture_output=True, text=True)
    if hits:
        assert p.returncode == -9 and p.stdout.split() == ["0"]
    else:
        assert p.returncode == 0 and p.stdout.split() == ["0", "1", "2"]


def test_nan_during_guidance_is_retried_with_derived_seed_or_dropped(tmp_path, registry, one_thread):
    """A guidance step that yields NaN never reaches disk: the sample is redrawn from a derived seed,
    or, when every retry fails too, dropped and counted in the summary. The NaN comes from the gradient of a
    later guided step (NaN logits, or a broken gradient on the first step, are the classifier's error: test_isolation)."""
    from synfer.labels import sample_seed
    from synfer.pipeline import run_recipe
    from synfer.recipe import load_recipe

    def recipe(name, poison):
        p = _write_recipe(tmp_path / f"{name}.yaml", tmp_path / name, num_images=3, grid=False, evaluators=[], experts=[],
                          generator={"plugin": "sd", "steps": 3, "chunk": 1, "layout": {"enabled": False}, "nan_retries": 1,
                                     "semantic_guidance": {"start": 0.0}},
                          guidance_classifier={"plugin": "dummy-nan", "poison_calls": poison, "skip_calls": 1, "poison": "gradient"})
        return load_recipe(p, registry=registry)

    s = run_recipe(recipe("once", 1), registry=registry, progress=False)
    rows = read_metadata(tmp_path / "once")
    assert s.failed == 0 and [r["index"] for r in rows] == [0, 1, 2]
    assert rows[0]["retry"] == 1 and rows[0]["seed"] == sample_seed(sample_seed(5, 0), 1)
    assert all("retry" not in r and r["seed"] == sample_seed(5, r["index"]) for r in rows[1:])

    s = run_recipe(recipe("always", -1), registry=registry, progress=False)
    assert s.failed == 3 and s.generated == 0
    assert "3 sample(s) failed" in s.table()
    assert not (tmp_path / "always" / METADATA).exists() or read_metadata(tmp_path / "always") == []
