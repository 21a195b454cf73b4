"""The dataset card (`README.md`) and provenance manifest (`provenance.json`) every `synfer run` writes.

A lab that publishes a synthetic set must say what made each image and under which terms. The
manifest names the recipe (sha256 of the resolved `recipe.json`), the seed, and every model that
touched an image (prompter, generator with its AU adapter, guidance classifier, calibrator, experts,
their face detectors) with the sha256 of its weights and its licence, plus the terms of the source
faces (FEText folders a stage read, e.g. the layout source). The card is a Hub dataset card: YAML front
matter (licence, task categories, size, label names, `configs`) and prose, the strictest term at the top.

Where the facts come from (no plugin is imported by name):
- a plugin class declares `licence` (its code and the weights it ships or fetches) and, where its
  weights or faces carry them, `data_terms` (e.g. RetinaFace's WIDER FACE, CC BY-NC-ND);
- a stage tells where its weights are through an optional `weights_path` attribute; else a
  `weights`/`model`/`path` setting naming an existing file or folder is taken;
- weights the recipe points at (not the plugin's default) have the licence their folder declares in
  a README.md front matter (`license: ...`, as on the Hub), else they are "not declared".

Nothing here depends on time, host or output path: a resumed run (or N workers) writes the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synfer.contract import labels as L
from synfer.engine.align import align_block
from synfer.engine.dataset import METADATA, DatasetError, atomic_write, iter_rows, read_metadata, write_json
from synfer.engine.recipe import expert_member
from synfer.engine.registry import get_registry
from synfer.engine.resume import RECIPE_FILE, resolved_recipe
from synfer.engine.stamps import folder_stamp, stamp_key

CARD = "README.md"
PROVENANCE = "provenance.json"
NOT_DECLARED = "not declared"
WEIGHT_FIELDS = ("weights", "model", "path", "checkpoint")  # settings that name a stage's own weights
# Hub licence ids for terms that are stated exactly so; anything else is `license: other`.
HUB_IDS = {"mit": "mit", "apache-2.0": "apache-2.0", "creativeml openrail-m": "creativeml-openrail-m"}
NON_COMMERCIAL = re.compile(r"\bNC\b|non-?commercial|research[- ]only|research use", re.I)
USE_RESTRICTED = re.compile(r"\bRAIL\b|openrail", re.I)


def strictness(term: str) -> int:
    """3 non-commercial, 2 not declared (could be anything), 1 use-based restrictions (OpenRAIL), 0 permissive."""
    if NON_COMMERCIAL.search(term):
        return 3
    if not term or term.startswith(NOT_DECLARED):
        return 2
    return 1 if USE_RESTRICTED.search(term) else 0


@dataclass
class ModelEntry:
    """One model that touched the images, as provenance.json and the card list it."""

    role: str  # generator, guidance_classifier, calibrator, expert, face_detector, prompter
    plugin: str
    provider: str
    version: str
    licence: str
    data_terms: str | None = None
    weights: str | None = None  # where the weights were read (None: the plugin loads none, or did not say)
    sha256: str | None = None
    parts: dict[str, str] = field(default_factory=dict)  # a folder's top-level entries -> sha256 (unet/, au_adapter...)


@dataclass
class SourceEntry:
    """Faces of a dataset folder a stage read (e.g. the layout source), by their `source` column."""

    folder: str
    source: str
    faces: int
    terms: str


# ---------------------------------------------------------------- hashing


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    """A folder's files in a fixed order; `work/` (training checkpoints, caches) and hidden files skipped."""
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "work" and not d.startswith("."))
        out += [Path(folder) / n for n in sorted(names) if not n.startswith(".")]
    return out


_HASHED: dict[str, tuple[str, dict[str, str]]] = {}  # stamp -> (sha256, parts): each weights folder hashed once a process


def weights_sha256(path: Path, cache: dict[str, Any] | None = None) -> tuple[str, dict[str, str]]:
    """sha256 of a weights file, or of a folder (over its files' relative paths and sha256s) with one digest per
    top-level entry. `cache` (stamp -> result, from the last provenance.json) skips rehashing unchanged weights."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        stamp = stamp_key([str(path.resolve()), f"{st.st_size}:{st.st_mtime_ns}"])
    else:
        stamp = stamp_key(folder_stamp(path, ("",)))
    if cache is not None and stamp in cache:
        return cache[stamp]["sha256"], cache[stamp]["parts"]
    if stamp in _HASHED:  # hashed already in this process (the rows' model name, then the card)
        return _HASHED[stamp]
    if path.is_file():
        digest, parts = _file_sha256(path), {}
    else:
        lines: dict[str, list[str]] = {}
        for f in _files(path):
            rel = f.relative_to(path).as_posix()
            lines.setdefault(rel.split("/")[0], []).append(f"{rel}\0{_file_sha256(f)}\n")
        parts = {top: hashlib.sha256("".join(ls).encode()).hexdigest() for top, ls in lines.items()}
        digest = hashlib.sha256("".join(line for ls in lines.values() for line in ls).encode()).hexdigest()
    if cache is not None:
        cache[stamp] = {"sha256": digest, "parts": parts}
    _HASHED[stamp] = digest, parts
    return digest, parts


# ---------------------------------------------------------------- what touched the images


def declared_licence(folder: Path) -> str | None:
    """`license:` of a model folder's README.md front matter (the Hub's model-card convention)."""
    card = folder / CARD
    if not card.is_file():
        return None
    m = re.match(r"^---\n(.*?)\n---", card.read_text(errors="replace"), flags=re.S)
    try:
        meta = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    return str(lic) if lic else None


def stage_weights(stage) -> Path | None:
    """Where a stage reads its weights: its `weights_path` when it has one, else an existing weights setting."""
    try:
        path = getattr(stage, "weights_path", None)
    except (OSError, ValueError):  # e.g. weights that were never fetched: nothing was read
        path = None
    if path is None:
        cfg = stage.config
        path = next((getattr(cfg, f) for f in WEIGHT_FIELDS if isinstance(getattr(cfg, f, None), str)), None)
    return Path(path).expanduser() if path is not None and Path(path).expanduser().exists() else None


def portable_name(path: Path) -> str:
    """A weights path as a published dataset may show it: as the recipe wrote it when relative, else the folder or
    file name only (an absolute path names the machine, not the model; the sha256 beside it names the weights)."""
    return str(path) if not Path(path).is_absolute() else Path(path).name


def model_entry(role: str, info, stage, cache: dict) -> ModelEntry:
    """One stage's provenance: plugin, provider, weights and their sha256, licence and data terms."""
    cls = info.cls
    licence = getattr(cls, "licence", None) or f"{NOT_DECLARED} (plugin {info.name} from {info.provider} declares no licence)"
    terms = getattr(cls, "data_terms", None)
    path = stage_weights(stage)
    own = any(getattr(stage.config, f, None) for f in WEIGHT_FIELDS)  # the recipe points at weights, not the plugin's default
    if own and path is not None:
        folder = path if path.is_dir() else path.parent
        declared = declared_licence(folder)
        licence = declared or (f"{NOT_DECLARED} for {portable_name(path)} (add `license:` to the front matter of "
                               f"{portable_name(folder / CARD)}; "
                               f"the plugin's default weights: {licence})")
        terms = None if declared else terms
    entry = ModelEntry(role, info.name, info.provider, info.version, licence, terms, portable_name(path) if path else None)
    if path is not None:
        entry.sha256, entry.parts = weights_sha256(path, cache)
    return entry


def recipe_stages(recipe) -> list[tuple[str, str, dict]]:
    """(role, kind, block) of every stage of a run recipe that touches an image or its label (evaluators only measure)."""
    out = [("prompter", "prompter", recipe.prompter), ("generator", "generator", recipe.generator)]
    if recipe.guidance_classifier:
        out.append(("guidance_classifier", "guidance_classifier", recipe.guidance_classifier))
    if recipe.calibrator:
        out.append(("calibrator", "calibrator", recipe.calibrator))
    for block in recipe.experts:
        out.append(("expert", "expert", expert_member(block)))
        detector = align_block(block.get("align"))
        if detector:
            out.append(("face_detector", "face_detector", {k: v for k, v in detector.items() if k not in ("size", "zoom")}))
    return out


def _folders(value) -> list[str]:
    """Strings in a (nested) stage config."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in _folders(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _folders(v)]
    return [value] if isinstance(value, str) else []


def source_entries(blocks: list[dict], registry) -> list[SourceEntry]:
    """The faces of every dataset folder (images + metadata.jsonl) a stage's settings name, counted by source,
    with the terms their Source plugin declares (`data_terms`) or the folder's own card (README.md `license:`)."""
    out = []
    for folder in dict.fromkeys(s for b in blocks for s in _folders(b)):
        root = Path(folder).expanduser()
        if not (root / METADATA).is_file():
            continue
        try:
            counts = Counter(str(r.get("source") or "unknown") for r in read_metadata(root, verify=False))
        except DatasetError:  # a folder still being written: its faces are counted on the next run
            continue
        own = declared_licence(root)
        for name, n in sorted(counts.items()):
            info = registry.plugins.get(("source", name))
            terms = own or (info and getattr(info.cls, "data_terms", None))
            out.append(SourceEntry(folder, name, n, terms or f"{NOT_DECLARED} (no source plugin named {name!r} declares terms, "
                                                              f"and {root / CARD} gives no `license:`)"))
    return out


def provenance(out: Path, recipe, registry=None) -> dict[str, Any]:
    """The manifest: recipe hash and seed, every model that touched the images, the source faces, the strictest term."""
    reg = registry or get_registry()
    old = _read_json(out / PROVENANCE)
    cache = dict(old.get("hash_cache", {})) if isinstance(old, dict) else {}
    recipe_file = out / RECIPE_FILE
    resolved = json.dumps(resolved_recipe(recipe, reg), sort_keys=True, indent=2)
    recipe_sha = _file_sha256(recipe_file) if recipe_file.is_file() else hashlib.sha256(resolved.encode()).hexdigest()
    models, blocks = [], []
    for role, kind, block in recipe_stages(recipe):
        info = reg.resolve(kind, block["plugin"])
        stage = reg.build(kind, block)  # weights load lazily: building reads none
        models.append(model_entry(role, info, stage, cache))
        blocks.append(block)
    sources = source_entries(blocks, reg)
    terms = [(m.licence, f"{m.role} {m.plugin}") for m in models]
    terms += [(m.data_terms, f"{m.role} {m.plugin}, data terms") for m in models if m.data_terms]
    terms += [(s.terms, f"source faces {s.source!r} of {s.folder}") for s in sources]
    strictest = max(terms, key=lambda t: strictness(t[0]))
    used = {stamp for stamp, v in cache.items() if any(v["sha256"] == m.sha256 for m in models)}
    return {
        "recipe": {"sha256": recipe_sha, "file": RECIPE_FILE, "seed": recipe.seed, "label_space": recipe.label_space,
                   "num_images": recipe.num_images},
        "models": [asdict(m) for m in models],
        "sources": [asdict(s) for s in sources],
        "strictest_term": {"term": strictest[0], "from": strictest[1]},
        "non_commercial": any(strictness(t) == 3 for t, _ in terms),
        "not_declared": [w for t, w in terms if strictness(t) == 2],
        "hash_cache": {k: cache[k] for k in sorted(used)},
    }


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------- the card


def size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M")):
        if n < bound:
            return name
    return "10M<n<100M"


def hub_licence(prov: dict) -> str:
    """The Hub's `license:` id when every term is the same known one ("MIT (synfer's own)" is MIT), else `other`."""
    terms = [m["licence"] for m in prov["models"]] + [m["data_terms"] for m in prov["models"] if m["data_terms"]]
    ids = {HUB_IDS.get(t.split(" (")[0].strip().lower(), "other") for t in terms + [s["terms"] for s in prov["sources"]]}
    return ids.pop() if len(ids) == 1 else "other"


def count_rows(rows) -> Counter:
    """One pass over a run's rows: `images`, `kept`, and per class `pre:<c>`, `final:<c>` (kept), `relabelled:<c>`,
    `dropped:<c>` (by preassigned class). Holds counts only, so an iterator of a million rows streams through."""
    n = Counter()
    for r in rows:
        kept, pre = r.get("kept", True), r.get("preassigned_label")
        n["images"] += 1
        n["kept"] += bool(kept)
        n[f"pre:{pre}"] += 1
        n[f"final:{r.get('label')}"] += bool(kept)
        n[f"relabelled:{pre}"] += bool(kept and r.get("label") != pre)
        n[f"dropped:{pre}"] += not kept
    return n


def front_matter(prov: dict, counts: Counter, name: str) -> dict[str, Any]:
    lic = hub_licence(prov)
    meta: dict[str, Any] = {"license": lic}
    if lic == "other":
        meta.update(license_name="synfer-combined-terms", license_link="README.md")  # the terms are listed below
    meta.update({
        "pretty_name": f"{name} (synthetic facial expressions, SynFER)",
        "task_categories": ["image-classification"],
        "task_ids": ["multi-class-image-classification"],
        "size_categories": [size_category(counts["images"])],
        "tags": ["synthetic", "facial-expression-recognition", "synfer"] + (["non-commercial"] if prov["non_commercial"] else []),
        "label_names": list(L.label_space(prov["recipe"]["label_space"])),
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": ["metadata.jsonl", "images/**"]}]}],
        "synfer": {"recipe_sha256": prov["recipe"]["sha256"], "seed": prov["recipe"]["seed"],
                   "label_space": prov["recipe"]["label_space"], "splits": {"train": counts["images"]},
                   "strictest_term": prov["strictest_term"]["term"], "non_commercial": prov["non_commercial"]},
    })
    return meta


def _cell(text) -> str:
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def render_card(prov: dict, counts: Counter, name: str) -> str:
    """README.md text: front matter, then the terms (strictest first), counts, models, sources and how to load it."""
    meta = yaml.safe_dump(front_matter(prov, counts, name), sort_keys=False, allow_unicode=True, width=1000)
    classes = L.label_space(prov["recipe"]["label_space"])
    strict = prov["strictest_term"]
    lines = [f"---\n{meta}---", "", f"# {name}: synthetic facial-expression images", ""]
    nc = (" **Non-commercial terms apply: this dataset may not be used commercially** (see Licences and terms)."
          if prov["non_commercial"] else "")
    lines += [f"> **Strictest term:** {strict['term']} (from {strict['from']}).{nc}", ""]
    if prov["not_declared"]:
        lines += [f"> **Not declared:** {', '.join(prov['not_declared'])}. Find out their terms before you publish or use this set.", ""]
    lines += ["## Summary", "",
              f"{counts['images']} images generated by synfer with the SynFER method (He, Luo et al., "
              f"\"SynFER: Towards Boosting Facial Expression Recognition with Synthetic Data\"): each image was drawn for a "
              f"preassigned expression, then an ensemble of expert classifiers voted on its label; {counts['kept']} are kept. "
              f"Label space `{prov['recipe']['label_space']}`: {', '.join(classes)}.", "",
              "| class | preassigned | final (kept) | relabelled | dropped |", "|---|---|---|---|---|"]
    for c in classes:
        lines.append(f"| {c} | {counts[f'pre:{c}']} | {counts[f'final:{c}']} | {counts[f'relabelled:{c}']} | {counts[f'dropped:{c}']} |")
    lines += ["", "## How it was made", "",
              f"Recipe: `{prov['recipe']['file']}` in this folder (the resolved recipe, sha256 `{prov['recipe']['sha256']}`), "
              f"seed {prov['recipe']['seed']}. Every sample's randomness derives from (seed, sample index), so the recipe "
              "regenerates these files. `provenance.json` holds the facts below as data.", "",
              "### Models that touched the images", "",
              "| role | plugin | provider | weights | sha256 | licence | data terms |", "|---|---|---|---|---|---|---|"]
    for m in prov["models"]:
        lines.append(f"| {m['role']} | `{m['plugin']}` | {m['provider']} {m['version']} | {_cell(m['weights'] and Path(m['weights']).name) or '(none)'} | "
                     f"{'`' + m['sha256'][:16] + '`' if m['sha256'] else ''} | {_cell(m['licence'])} | {_cell(m['data_terms'])} |")
        for part, digest in m["parts"].items():
            if "adapter" in part or "lora" in part:  # the AU adapter (or LoRA) the generator folder holds
                lines.append(f"| {m['role']} adapter | `{part}` | | | `{digest[:16]}` | {_cell(m['licence'])} | |")
    lines += ["", "### Source faces", ""]
    if prov["sources"]:
        lines += ["Faces of these folders shaped the images (e.g. layout initialization inverts them):", "",
                  "| folder | source | faces | terms |", "|---|---|---|---|"]
        lines += [f"| {_cell(s['folder'])} | {s['source']} | {s['faces']} | {_cell(s['terms'])} |" for s in prov["sources"]]
    else:
        lines.append("No stage read a folder of faces (no layout source).")
    lines += ["", "## Licences and terms", "",
              "The terms of the models and source faces that made these images, as their plugins and folders declare them. "
              "Read each before you publish or use the set; the front matter's `license` is `other` unless all agree."]
    if prov["non_commercial"]:
        lines.append("")
        lines.append("**Non-commercial:** at least one of them allows non-commercial (research) use only, so this dataset does too.")
    terms = [(m["licence"], f"{m['role']} `{m['plugin']}`") for m in prov["models"]]
    terms += [(m["data_terms"], f"{m['role']} `{m['plugin']}` (data)") for m in prov["models"] if m["data_terms"]]
    terms += [(s["terms"], f"source faces `{s['source']}`") for s in prov["sources"]]
    lines += [""] + [f"- {_cell(t)}: {w}" for t, w in sorted(terms, key=lambda t: -strictness(t[0]))]
    lines += ["", "## Columns and loading", "",
              "`metadata.jsonl` has one row per image: `file_name`, `index`, `seed`, `prompt`, `aus` (AU intensities in [0, 1]), "
              "`preassigned_label`, `label` (the final class name), `soft_label` (over the label space), `agreement`, `kept`, "
              "`predictions` (each voter's probabilities).", "",
              "```python", "import synfer", "",
              "ds = synfer.open_dataset(\"FOLDER\").to_datasets()  # ClassLabel labels, AUs as columns",
              "ds = ds.filter(lambda kept: kept, input_columns=\"kept\")  # the kept rows", "```", "",
              "or, without synfer: `datasets.load_dataset(\"imagefolder\", data_dir=\"FOLDER\")`.", "",
              "## Limitations", "",
              "The faces are synthetic and the labels come from classifiers, not from people: they carry those models' biases "
              "and errors. Check a sample by eye (the grid beside this folder, `report.html`) before training on it.", ""]
    return "\n".join(lines)


def write_card(out: str | os.PathLike, recipe, registry=None) -> Path:
    """Write `<out>/provenance.json` and `<out>/README.md` (atomically) for a run's output; returns the card's path."""
    out = Path(out)
    prov = provenance(out, recipe, registry)
    counts = count_rows(iter_rows(out))  # streamed: a million rows are counted, not held
    write_json(out / PROVENANCE, prov)
    return atomic_write(out / CARD, render_card(prov, counts, out.name))
