"""The documentation stays true: cited paths exist, links resolve, the README stays short and
its measured numbers point at docs/results.md, and the plugin template's package passes its own test."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_dist, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "out", "build", "dist", "node_modules", "__pycache__", ".pytest_cache", "work_dirs", "cache"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".txt", ".html"}
# A cited path: a Markdown file written with a folder or in capitals (README.md, docs/x.md,
# ../docs/x.md, DESIGN.md), or a test module (tests/test_x.py). Lower-case bare names such as
# `tables.md` are files a script writes, not citations. Nothing inside a URL starts a match.
TOKEN = re.compile(r"(?<![\w./:-])((?:\.{1,2}/)*(?:[\w.-]+/)*[\w.-]+\.md|tests/[\w/]+\.py)\b")
PLACEHOLDER = re.compile(r"^(?:\.\./)*[A-Z][A-Z_]*/")  # OUT/tables.md, DATASET/...: a folder the user names


def repo_files():
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if path == Path(__file__).resolve():
            continue  # this file's own examples of what a citation looks like
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name == "Makefile"):
            yield path


def citations(text: str):
    for m in TOKEN.finditer(text):
        cited = m.group(1)
        stem = cited.rsplit("/", 1)[-1][:-3]
        if cited.endswith(".md") and "/" not in cited and not stem.isupper():
            continue
        if PLACEHOLDER.match(cited):
            continue
        yield cited


def test_every_cited_path_exists():
    missing = []
    for path in repo_files():
        for cited in citations(path.read_text(errors="replace")):
            if not ((ROOT / cited).exists() or (path.parent / cited).exists()):
                missing.append(f"{path.relative_to(ROOT)} cites {cited}")
    assert not missing, "paths cited but not in the repository:\n" + "\n".join(sorted(set(missing)))


def test_citation_pattern_finds_what_it_should():
    text = "see DESIGN.md and docs/plugins.md, [x](../docs/results.md#a), tests/test_core.py; writes OUT/tables.md and tables.md"
    assert list(citations(text)) == ["DESIGN.md", "docs/plugins.md", "../docs/results.md", "tests/test_core.py"]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def markdown_files():
    return [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_markdown_links_and_anchors_resolve():
    broken = []
    for md in markdown_files():
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no heading with that anchor)")
    assert not broken, "\n".join(broken)


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 8000, f"README.md is {size} bytes; keep it under 8,000 (measurements belong in docs/results.md)"


def test_readme_measured_numbers_link_to_results():
    text = (ROOT / "README.md").read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    linked = re.findall(r"\[([^\]]+)\]\(docs/results\.md(?:#[\w-]+)?\)", text)
    assert len(linked) >= 5, "the results table should link its numbers to docs/results.md"
    bare = re.sub(r"\[([^\]]+)\]\(docs/results\.md(?:#[\w-]+)?\)", "", text)
    # Measured-looking numbers: fractions (0.97), percentages, seconds, minutes, images/s.
    found = re.findall(r"(?<![\w.])(?:0\.\d+|\d+(?:\.\d+)?\s?%|\d+(?:\.\d+)?\s?(?:s|min|images/s|img/s)\b)", bare)
    assert not found, f"README numbers that do not link to docs/results.md: {found}"


@pytest.mark.slow
def test_plugin_template_passes_its_own_test(tmp_path):
    """`synfer plugin new` writes a package whose test passes, installed as a distribution would be."""
    from synfer.commands.scaffold import write_plugin

    pkg = write_plugin("acme-fer", tmp_path / "src")
    assert (pkg / "synfer_acme_fer" / "weights" / "model.safetensors").stat().st_size > 1000
    site = make_dist(tmp_path / "site", "synfer-acme-fer", {"acme-fer": "synfer_acme_fer"})
    env = subprocess_env(pkg, site)
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
                         cwd=pkg, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 passed" in run.stdout
    listed = subprocess.run([sys.executable, "-m", "synfer", "plugins", "--json"], env=env, capture_output=True, text=True, timeout=300)
    import json

    rows = json.loads(listed.stdout)["plugins"]
    assert any({"name": "acme-fer", "stage": "guidance_classifier", "provider": "synfer-acme-fer", "version": "0.0.1"}.items() <= r.items()
               for r in rows)


def test_plugin_template_refuses_bad_names_and_overwrites(tmp_path):
    import click

    from synfer.commands.scaffold import names, write_plugin

    assert names("my-fer") == {"name": "my-fer", "dist": "synfer-my-fer", "module": "synfer_my_fer", "cls": "MyFerClassifier"}
    for bad in ("My_FER", "1fer", "fer-", "fer net"):
        with pytest.raises(click.BadParameter, match="lowercase"):
            names(bad)
    write_plugin("x", tmp_path)
    with pytest.raises(click.ClickException, match="already exists"):
        write_plugin("x", tmp_path)


def test_recipe_reference_is_up_to_date():
    """docs/recipes.md and docs/recipe.schema.json are what `synfer recipe docs` writes now."""
    import json

    from synfer.engine.registry import Registry
    from synfer.commands.recipedocs import render, schema

    reg = Registry()
    reg.load_entrypoints()
    hint = "out of date: run `synfer recipe docs` and commit docs/recipes.md and docs/recipe.schema.json"
    assert (ROOT / "docs" / "recipes.md").read_text() == render(reg), hint
    assert json.loads((ROOT / "docs" / "recipe.schema.json").read_text()) == json.loads(json.dumps(schema(reg))), hint


def test_recipe_reference_documents_every_builtin_key():
    from synfer.engine.registry import Registry
    from synfer.commands.recipedocs import render

    reg = Registry()
    reg.load_entrypoints()
    text = render(reg)
    builtins = [p for p in reg.plugins.values() if p.provider == "synfer"]
    assert len(builtins) >= 20
    for p in builtins:
        if p.kind in ("au_detector", "calibrator", "captioner", "evaluator", "expert", "generator", "guidance_classifier",
                      "prompter", "source", "upscaler"):
            assert f"### {p.kind} {p.name}\n" in text, p.name
            for key in p.cls.Config.model_fields:
                assert f"| `{key}` |" in text, f"{p.kind} {p.name}: {key}"
    assert "| `generator` | dict[str, Any] | **required** |" in text


def test_recipe_schema_accepts_the_shipped_recipes_and_names_every_key():
    """A small walk of the schema for the stage blocks (jsonschema is not a dependency)."""
    import json

    import yaml

    sch = json.loads((ROOT / "docs" / "recipe.schema.json").read_text())
    props = sch["properties"]

    def options(field):
        p = props[field]
        block = p["items"] if p.get("type") == "array" else p
        while "anyOf" in block and not any("title" in o for o in block["anyOf"]):
            block = block["anyOf"][0]
        return {o["properties"]["plugin"].get("const"): o for o in block["anyOf"]}

    for recipe in ("quickstart.yaml", "sd15-affectnet8.yaml"):
        data = yaml.safe_load((ROOT / "recipes" / recipe).read_text())
        assert set(data) <= set(props), set(data) - set(props)
        for field in ("prompter", "generator", "guidance_classifier", "calibrator", "experts", "evaluators"):
            blocks = data.get(field) or []
            for block in blocks if isinstance(blocks, list) else [blocks]:
                opt = options(field)[block["plugin"]]
                assert set(block) <= set(opt["properties"]), f"{recipe} {field}: {set(block) - set(opt['properties'])}"
    assert options("generator")["sd"]["additionalProperties"] is False


@pytest.mark.slow
def test_recipe_docs_command_checks_without_torch(tmp_path):
    code = ("import sys; from click.testing import CliRunner; from synfer.commands.cli import main; "
            "r = CliRunner().invoke(main, ['recipe', 'docs', '--check']); print(r.output); "
            "assert r.exit_code == 0, r.output; assert 'torch' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "up to date" in run.stdout
    stale = subprocess.run([sys.executable, "-m", "synfer", "recipe", "docs", "--check", "--out", str(tmp_path)],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert stale.returncode == 1 and "out of date" in stale.stderr


def test_plugin_guide_examples_run(monkeypatch):
    """Every ```python block of docs/plugins.md runs, in order, as the module `synfer_acme`."""
    import types

    text = (ROOT / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 7, "docs/plugins.md lost its examples"
    module = types.ModuleType("synfer_acme")
    module.__file__ = str(ROOT / "docs" / "plugins.md")
    monkeypatch.setitem(sys.modules, "synfer_acme", module)
    for i, code in enumerate(blocks, 1):
        exec(compile(code, f"docs/plugins.md (python block {i})", "exec"), module.__dict__)
    assert {"BrightnessExpert", "MouthGuidance", "KeptEvaluator", "reg"} <= set(vars(module))


def test_recipe_reference_descriptions_are_whole():
    """A field comment that wraps onto comment-only lines is documented whole, not cut off mid-sentence."""
    from synfer.engine.registry import Registry
    from synfer.commands.recipedocs import render

    reg = Registry()
    reg.load_entrypoints()
    text = render(reg)
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \|.*\| (.*) \|$", text, flags=re.M)}
    assert "Changes the bytes" in rows["forward_dtype"] and "UniPC" in rows["scheduler"], (rows["forward_dtype"], rows["scheduler"])
    cut = {k: v for k, v in rows.items() if v.rstrip().endswith((":", ",", "(", " or", " and", " the"))}
    assert not cut, f"descriptions cut off mid-sentence: {cut}"
