"""One contract per stage, in one place: the stage classes (synfer.contract.stages). registry.yaml's kinds, the stage
table and hook reference of docs/plugins.md, and the core's kind lists are checked against them here."""
from __future__ import annotations

import inspect
from pathlib import Path

import yaml

from synfer.contract import contracts, hookspecs
from synfer.contract.stages import STAGE_KINDS, Generator, Stage
from synfer.engine import recipe, registry

ROOT = Path(__file__).resolve().parents[1]
PLUGINS_MD = (ROOT / "docs" / "plugins.md").read_text()


def summary(cls) -> str:
    """A class docstring's first sentence as registry.yaml words it (lower-case start, no full stop)."""
    first = inspect.getdoc(cls).split("\n\n")[0].replace("\n", " ").strip().rstrip(".")
    return first if first[:2].isupper() else first[0].lower() + first[1:]  # "FERAnno, ..." keeps its capitals


def test_registry_yaml_describes_every_kind_as_its_class_does():
    described = yaml.safe_load((ROOT / "registry.yaml").read_text())["stages"]
    assert described == {kind: summary(cls) for kind, cls in STAGE_KINDS.items()}


def table_rows() -> dict[str, str]:
    section = PLUGINS_MD[PLUGINS_MD.index("## The stage kinds"):]
    return {line.split("|")[1].strip().strip("`"): line for line in section.splitlines()
            if line.startswith("| `")}


def test_the_stage_table_shows_every_abstract_method_with_its_parameters():
    rows = table_rows()
    assert set(STAGE_KINDS) <= set(rows), set(STAGE_KINDS) - set(rows)
    for kind, cls in STAGE_KINDS.items():
        for name in cls.__abstractmethods__:
            params = [p for p in inspect.signature(getattr(cls, name)).parameters if p != "self"]
            assert f"`{name}(" in rows[kind], (kind, name)
            call = rows[kind][rows[kind].index(f"`{name}("):].split("`")[1]
            assert all(p in call for p in params), (kind, name, params, call)


def test_every_hook_is_documented_with_its_parameters():
    assert registry.HOOKS == hookspecs.HOOKS == ("register_stages", "register_label_spaces", "register_commands")
    for hook in hookspecs.HOOKS:
        params = list(inspect.signature(getattr(hookspecs, hook)).parameters)
        assert f"{hook}({', '.join(params)})" in PLUGINS_MD, hook


def test_the_kind_lists_are_read_off_the_stage_classes():
    assert set(contracts.PREDICTING) == {"guidance_classifier", "expert", "calibrator"}
    assert all(STAGE_KINDS[k].predicts for k in contracts.PREDICTING)
    assert registry.SLOT_KINDS == {"expert": ("expert", "guidance_classifier")}
    assert recipe.ENSEMBLE_KEYS == ("weight", "align")
    assert contracts.reserved_names("face_detector") == ("plugin", "size", "zoom")
    assert contracts.reserved_names("no-such-kind") == Stage.reserved
    assert set(recipe.Recipe.stage_slots.values()) | set(recipe.Recipe.stage_lists.values()) <= set(STAGE_KINDS)


def test_the_generator_contract_declares_what_the_engine_reads():
    """The engine reads `chunk`, `batch_size` and `target_device()` of a generator: each has a default in the class."""

    class Minimal(Generator):
        name = "minimal"

        def generate(self, requests, guidance=None):
            return []

    g = Minimal()
    assert (g.chunk, g.batch_size, g.target_device()) == (1, 8, "cpu")
    g.config = type("C", (), {"batch_size": 3})()
    assert g.batch_size == 3
