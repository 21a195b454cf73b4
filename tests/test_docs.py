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
    from synfer.scaffold import write_plugin

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
    assert {"name": "acme-fer", "stage": "guidance_classifier", "provider": "synfer-acme-fer", "version": "0.0.1"} in rows


def test_plugin_template_refuses_bad_names_and_overwrites(tmp_path):
    import click

    from synfer.scaffold import names, write_plugin

    assert names("my-fer") == {"name": "my-fer", "dist": "synfer-my-fer", "module": "synfer_my_fer", "cls": "MyFerClassifier"}
    for bad in ("My_FER", "1fer", "fer-", "fer net"):
        with pytest.raises(click.BadParameter, match="lowercase"):
            names(bad)
    write_plugin("x", tmp_path)
    with pytest.raises(click.ClickException, match="already exists"):
        write_plugin("x", tmp_path)
