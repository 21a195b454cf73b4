"""Chunked batching (issue 17): a sample's bytes depend on `generator.chunk` only, never on batch_size,
the number of torchrun workers, a resume, or which other samples share its chunk."""
import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from synfer.engine.dataset import DatasetWriter  # noqa: E402
from synfer.stages import SampleRequest  # noqa: E402
from test_generator import CAPTIONS, generator, requests  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def faces(folder, n=6, size=32):
    """A small FEText folder for layout initialization: smooth coloured faces of a few classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w = DatasetWriter(folder)
    for i in range(n):
        w.write(i, Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)), {"expression": ["happy", "sad", "neutral"][i % 3]})
    return folder


def pixels(samples):
    return {s.request.index: np.asarray(s.image) for s in samples}


@pytest.mark.parametrize("method", ["plain", "guided+layout"])
def test_a_sample_depends_on_its_chunk_position_not_its_neighbours(model_dir, classifier, tmp_path, method):
    extra, guidance = {}, None
    if method != "plain":
        extra = {"layout": {"enabled": True, "source": str(faces(tmp_path / "fetext")), "depth": 0.5, "expressions": None},
                 "semantic_guidance": {"start": 0.3, "lambda_g": 0.5, "micro_batch": 2}}
        guidance = classifier
    g = generator(model_dir, chunk=4, **extra)
    full = pixels(g.generate(requests(8), guidance))  # two whole chunks
    assert len(full) == 8 and not np.array_equal(full[0], full[1])
    # a resume: chunk 0 half on disk, chunk 1 with one sample left; the free slots are padding
    some = pixels(g.generate([r for r in requests(8) if r.index in (1, 2, 7)], guidance))
    assert sorted(some) == [1, 2, 7] and all(np.array_equal(some[i], full[i]) for i in some)
    # other samples in the chunk (other seeds, prompts, AUs, classes): the same bytes for index 2
    others = [SampleRequest(index=i, seed=77 + i, expression="angry", aus={"AU4": 1.0}, prompt=CAPTIONS[1]) for i in (0, 1, 3)]
    mixed = pixels(g.generate(others + [r for r in requests(4) if r.index == 2], guidance))
    assert np.array_equal(mixed[2], full[2])
    # a short last chunk (num_images 6) is padded to the chunk's shape
    short = pixels(g.generate(requests(6), guidance))
    assert all(np.array_equal(short[i], full[i]) for i in range(6))


def test_chunk_1_is_the_old_exact_path(model_dir):
    """chunk=1 runs each sample alone (what exact_batching=true did); another chunk is another batch shape,
    which may round differently (by a uint8 step; on this 16-px model it happens not to)."""
    reqs = requests(4)
    one = generator(model_dir, chunk=1).generate(reqs)
    g = generator(model_dir, chunk=1)
    alone = [g.to_pil(g.sample([r]))[0] for r in requests(4)]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b)) for a, b in zip(one, alone))
    four = pixels(generator(model_dir, chunk=4).generate(requests(4)))
    diff = [np.abs(np.asarray(a.image, dtype=int) - four[a.request.index].astype(int)).max() for a in one]
    print("max pixel difference chunk 1 vs chunk 4:", diff)
    assert max(diff) <= 2  # batched kernels round differently, by a uint8 step or so


def test_exact_batching_is_retired_with_a_pointer_to_chunk(registry, tmp_path):
    from synfer.engine.recipe import RecipeError, load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"generator": {"plugin": "sd", "exact_batching": False}}))
    with pytest.raises(RecipeError, match=r"exact_batching was retired.*generator.chunk=1.*generator.chunk=<your batch_size>"):
        load_recipe(p, registry=registry)
    p.write_text(yaml.safe_dump({"generator": {"plugin": "sd"}}))
    with pytest.raises(RecipeError, match="exact_batching was retired"):
        load_recipe(p, ["generator.exact_batching=true"], registry=registry)


def _recipe(tmp_path, name, **gen):
    """The shipped tiny model with layout init, semantic guidance, FERAnno and a vote: 10 samples, 3 steps."""
    from synfer.engine.recipe import validate_data

    src = tmp_path / "fetext"
    if not src.exists():
        faces(src, size=32)
    return {"seed": 3, "num_images": 10, "output": str(tmp_path / name), "grid": False, "report": False,
            "generator": {"plugin": "sd", "steps": 3, "chunk": 4, **gen,
                          "layout": {"enabled": True, "source": str(src), "depth": 0.6, "expressions": "match"}},
            "guidance_classifier": {"plugin": "tiny-cnn"}, "calibrator": {"plugin": "feranno"},
            "experts": [{"plugin": "tiny-cnn", "weight": 1.0}]}, validate_data


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow  # three diffusion runs of the shipped model (~20 s on 2 cores)
def test_run_bytes_identical_at_batch_sizes_1_8_16(tmp_path, registry):
    from synfer.engine.pipeline import run_recipe

    got = {}
    for bs in (1, 8, 16):  # and the layout bank: off at 1, filled at 8, read at 16 (the same bytes each way)
        data, validate = _recipe(tmp_path, f"bs{bs}", batch_size=bs)
        data["generator"]["layout"]["bank"] = bs != 1
        run_recipe(validate(data, registry), registry=registry, progress=False)
        got[bs] = _files(tmp_path / f"bs{bs}")
    assert len([k for k in got[1] if k.startswith("images/")]) == 10
    for bs in (8, 16):
        assert sorted(got[bs]) == sorted(got[1])
        # images and metadata; recipe.json and the card (README.md, provenance.json) record the recipe, batch size included
        assert [k for k in got[1] if got[bs][k] != got[1][k] and k not in ("recipe.json", "README.md", "provenance.json")] == []
    assert len(list((tmp_path / "fetext" / "work").glob("layout-*/*.safetensors"))) > 0


@pytest.mark.slow  # four `synfer run` subprocesses of the shipped model
def test_interrupted_and_killed_runs_resume_to_the_same_bytes(tmp_path, registry):
    """A run stopped inside a chunk (--limit 6 with chunks of 4), then SIGKILLed after the next chunk's images
    were renamed into place, then rerun: the same files as one uninterrupted run."""
    import os
    import subprocess
    import sys

    from conftest import HERE, subprocess_env

    env = {**subprocess_env(HERE), "OMP_NUM_THREADS": "1"}
    env.pop("SYNFER_CRASH_AT", None)

    def run(name, *extra, crash=None):
        data, _ = _recipe(tmp_path, name, batch_size=4)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        e = {**env, **({"SYNFER_CRASH_AT": crash} if crash else {})}
        return subprocess.run([sys.executable, "-m", "synfer", "-q", "run", str(path), *extra], env=e, capture_output=True,
                              text=True, timeout=600, cwd=os.getcwd())

    ref = run("ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    first = run("cut", "--limit", "6")  # chunk 1 = [4, 8) half done
    assert first.returncode == 0, first.stderr[-2000:]
    assert len(list((tmp_path / "cut" / "images").glob("*.png"))) == 6
    killed = run("cut", crash="write:2")  # [6, 8) written, then killed with [8, 10) renamed but not recorded
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = run("cut")
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = _files(tmp_path / "ref"), _files(tmp_path / "cut")
    assert len([k for k in a if k.startswith("images/")]) == 10
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k] and k != "README.md"] == []  # the card names its folder (ref, cut)


def test_shards_are_whole_chunks_and_cover_the_plan_once():
    from synfer.engine.pipeline import shard, shard_size

    for n in (0, 1, 7, 10, 33):
        for chunk in (1, 3, 4, 16):
            for world in (1, 2, 3):
                got = [list(shard(n, chunk, rank, world)) for rank in range(world)]
                assert sorted(i for g in got for i in g) == list(range(n))
                assert [len(g) for g in got] == [shard_size(n, chunk, rank, world) for rank in range(world)]
                assert all((i // chunk) % world == rank for rank, g in enumerate(got) for i in g)
    assert list(shard(10, 4, 1, 2)) == [4, 5, 6, 7]


def test_the_run_hands_the_generator_whole_chunks(registry, tmp_path, monkeypatch):
    """A generator with `chunk` 4 and batch_size 6 gets 2 chunks per call; a resume hands it the rest of a chunk."""
    from synfer.engine.pipeline import run_recipe
    from synfer.engine.recipe import validate_data

    gen = registry.get("generator", "dummy")
    calls = []
    orig = gen.generate
    monkeypatch.setattr(gen, "chunk", 4, raising=False)
    monkeypatch.setattr(gen, "generate", lambda self, reqs, guidance=None: calls.append([r.index for r in reqs]) or orig(self, reqs, guidance))
    data = {"seed": 1, "num_images": 10, "output": str(tmp_path / "o"), "grid": False, "report": False,
            "generator": {"plugin": "dummy", "batch_size": 6}}
    run_recipe(validate_data(data, registry), registry=registry, progress=False, limit=6)
    assert calls == [[0, 1, 2, 3, 4, 5]]  # chunk 1 cut short by the limit
    calls.clear()
    run_recipe(validate_data(data, registry), registry=registry, progress=False)
    assert calls == [[6, 7, 8, 9]]  # the rest of chunk 1, then chunk 2 (short): two chunks in one call
    calls.clear()
    run_recipe(validate_data({**data, "num_images": 20, "generator": {"plugin": "dummy", "batch_size": 1}}, registry),
               registry=registry, progress=False)
    assert calls == [[10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]  # batch_size 1 still gets whole chunks
