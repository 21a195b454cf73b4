"""FEText construction (paper 4.2.1): faces from several sources -> one resolution ->
AU annotation -> expression-focused caption -> an image-text-AU-label dataset on disk.

`synfer fetext build RECIPE [key=value ...]` streams the sources in batches through the
upscaler, the AU detector and the captioner (all plugins) and writes with
`synfer.engine.dataset.DatasetWriter`. A record's index is its position in the concatenated,
deterministic source streams, so a rerun skips what is on disk (resume).
No torch import here: building stages is the plugins' business.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import click
from pydantic import Field

from synfer.commands.options import threads_option
from synfer.contract import labels as L
from synfer.engine.dataset import DatasetWriter, atomic_write
from synfer.engine.lock import OutputLock, refuse_other_kind
from synfer.engine.recipe import LabelSpaceName, OutputDir, RecipeError, RecipeModel, Seed, read_yaml, validate_recipe
from synfer.engine.registry import get_registry
from synfer.engine.threads import configure as configure_threads

SUMMARY_FILE = "fetext_summary.json"
STAGE_BLOCKS = {"upscaler": "upscaler", "captioner": "captioner", "au_detector": "au_detector"}


class FETextRecipe(RecipeModel):
    stage_slots: ClassVar[dict[str, str]] = STAGE_BLOCKS
    stage_lists: ClassVar[dict[str, str]] = {"sources": "source"}

    output: OutputDir = "out/fetext"  # dataset folder (images/ + metadata.jsonl)
    size: int = Field(64, ge=8)  # every face is aligned to size x size (resolution alignment)
    label_space: LabelSpaceName = "affectnet8"  # classes kept; the `label` column indexes this space
    sources: list[dict[str, Any]] = Field(min_length=1)  # each {plugin: name, ...config}, read in order
    upscaler: dict[str, Any] = {"plugin": "lanczos"}
    captioner: dict[str, Any] = {"plugin": "template"}
    au_detector: dict[str, Any] | None = {"plugin": "ground-truth"}  # None: keep the AUs the source gives
    batch_size: int = Field(64, gt=0)
    seed: Seed = 0  # handed to every stage whose Config has a `seed` the recipe leaves unset
    limit: int | None = Field(None, gt=0)  # stop after this many records in total


def validate_fetext(data: dict, registry=None, source: str = "recipe", problems=()) -> FETextRecipe:
    """Check the recipe and every stage block without loading weights; all problems at once."""
    registry = registry or get_registry()
    return validate_recipe(FETextRecipe, data, registry, source, [*problems, *_tag_problems(data.get("sources"), registry)])


def _tag_problems(sources, registry) -> list[str]:
    """Records are keyed by source tag and file: two sources under one tag would collide."""
    problems, tags = [], {}
    for i, block in enumerate(sources if isinstance(sources, list) else []):
        if not isinstance(block, dict) or ("source", block.get("plugin")) not in registry.plugins:
            continue
        if "tag" in registry.get("source", block["plugin"]).Config.model_fields:
            tag = block.get("tag") or block["plugin"]
            if tag in tags:
                problems.append(f"sources.{i}: writes source {tag!r} like sources.{tags[tag]}; records are keyed by source and "
                                f"file, so two sources need distinct names: set `tag:` on one of them")
            tags.setdefault(tag, i)
    return problems


def load_fetext_recipe(path: str | Path, overrides=(), registry=None) -> FETextRecipe:
    problems: list[str] = []
    data = read_yaml(path, overrides, problems)
    return validate_fetext(data, registry, str(path), problems)


def build_stage(registry, kind: str, block: dict, seed: int):
    """registry.build, with the recipe seed filled into a `seed` field the block leaves unset."""
    block = dict(block)
    cls = registry.get(kind, block["plugin"])
    if "seed" in cls.Config.model_fields and "seed" not in block:
        block["seed"] = seed
    return registry.build(kind, block)


# ---------------------------------------------------------------- summary


@dataclass
class FETextSummary:
    output: str
    written: int = 0  # this run
    resumed: int = 0  # already on disk, skipped
    total: int = 0  # rows in the dataset now
    per_class: Counter = field(default_factory=Counter)  # whole dataset
    per_source: Counter = field(default_factory=Counter)  # whole dataset
    filtered: Counter = field(default_factory=Counter)  # reason -> records left out on purpose
    skipped: list[str] = field(default_factory=list)  # "path (why)" of files left unread or refused, from every source
    inserted: int = 0  # records new to a source since the last build, placed among those already there
    gone: int = 0  # records on disk that the sources no longer give (kept)
    unmeasured: int = 0  # faces written this run whose AUs the au_detector could not measure (aus: null)
    au_detector: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> time spent in it this run
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return {"output": self.output, "written": self.written, "resumed": self.resumed, "total": self.total,
                "per_class": dict(self.per_class), "per_source": dict(self.per_source), "filtered": dict(self.filtered),
                "skipped_count": len(self.skipped), "skipped_reasons": dict(skip_reasons(self.skipped)), "skipped": self.skipped,
                "source_changed": {"inserted": self.inserted, "gone": self.gone}, "aus_unmeasured": self.unmeasured,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "wall_s": round(self.wall_s, 3)}

    def table(self, show_skipped: int = 5) -> str:
        lines = [f"FEText: {self.total} images in {self.output} ({self.written} written now, {self.resumed} already there)"]
        lines.append("per class:  " + ", ".join(f"{k} {v}" for k, v in sorted(self.per_class.items())))
        lines.append("per source: " + ", ".join(f"{k} {v}" for k, v in sorted(self.per_source.items())))
        if self.filtered:
            lines.append("left out:   " + ", ".join(f"{k} {v}" for k, v in sorted(self.filtered.items())))
        if self.skipped:
            more = f" (+{len(self.skipped) - show_skipped} more, see {SUMMARY_FILE})" if len(self.skipped) > show_skipped else ""
            reasons = ", ".join(f"{n} {why}" for why, n in skip_reasons(self.skipped).most_common())
            lines.append(f"skipped {len(self.skipped)} file(s) or row(s) ({reasons}): " + ", ".join(self.skipped[:show_skipped]) + more)
        if self.unmeasured:
            lines.append(f"warning: {self.au_detector} measured no AUs on {self.unmeasured} of {self.written} face(s) written now "
                         "(no face found): their `aus` are null. Aligned face crops: set au_detector.detector=null; "
                         "otherwise check those images")
        if self.inserted or self.gone:
            lines.append(f"source changed since the last build: {self.inserted} record(s) new among those already there "
                         f"(written under the next free indices), {self.gone} record(s) on disk no longer given by the sources "
                         "(kept; build into a new folder to drop them)")
        if self.wall_s > 0:
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
            lines.append(f"time {self.wall_s:.1f}s wall ({self.written / self.wall_s:.0f} img/s); by stage: {stages} "
                         "(write runs in a background thread, overlapping the others)")
        return "\n".join(lines)


class NoFaces(click.ClickException):
    """A build whose sources gave no face at all."""

    def __init__(self, summary: "FETextSummary"):
        why = [f"{n} left out: {k}" for k, n in sorted(summary.filtered.items())]
        why += [f"{n} skipped: {k}" for k, n in skip_reasons(summary.skipped).most_common()]
        first = f" (first: {summary.skipped[0]})" if summary.skipped else ""
        super().__init__(f"the sources gave no faces, so {summary.output} holds none: "
                         + ("; ".join(why) + first if why else "they yielded no records (is the root the right folder?)")
                         + ". A folder of unlabelled photos: imagefolder with `unlabelled: true`, or label them first "
                           "with 'synfer label FOLDER --recipe recipes/label-photos.yaml output=LABELLED' and use LABELLED as the root.")


def skip_reasons(skipped: list[str]) -> Counter:
    """"path (why: detail)" entries -> Counter of the why ("unreadable", "too small", "missing", ...)."""
    out: Counter = Counter()
    for entry in skipped:
        why = "other"
        for m in re.finditer(r" \(([a-z][a-z ]*?)(?=:|\)| \()", entry):  # the first "(word..." after the path
            why = m.group(1)
            break
        out[why] += 1
    return out


# ---------------------------------------------------------------- record identity


class KeyBook:
    """Stable record identity for resume: a record is keyed by its source and file (or CSV row),
    `source:file`; a source that names no file (the procedural world) keys by its position in
    that source's stream, `source#n`. Keys already on disk keep their index; a new key gets the
    next free index, so fixing, adding or removing a source file never duplicates, drops or
    renumbers a record, and a killed build resumes to the files an uninterrupted one writes."""

    def __init__(self, rows: list[dict]):
        self.on_disk: dict[str, int] = {}
        ordinals: Counter = Counter()
        for r in sorted((r for r in rows if "index" in r), key=lambda r: r["index"]):
            key = self.key(str(r.get("source")), r.get("attributes"), ordinals)
            self.on_disk.setdefault(key, r["index"])
        self.next = max(self.on_disk.values(), default=-1) + 1
        self.seen: set[str] = set()
        self._ordinals: Counter = Counter()
        self._new = 0
        self.inserted = 0

    @staticmethod
    def key(source: str, attributes, ordinals: Counter) -> str:
        file = (attributes or {}).get("file") if isinstance(attributes, dict) else None
        if file is not None:
            return f"{source}:{file}"
        ordinals[source] += 1
        return f"{source}#{ordinals[source] - 1}"

    def claim(self, record) -> int | None:
        """The index to write `record` under; -1 when it is on disk already; None when this build gave its key before."""
        key = self.key(record.source, record.attributes, self._ordinals)
        if key in self.seen:
            return None
        self.seen.add(key)
        if key in self.on_disk:
            self.inserted = self._new  # new records before one already there: the source changed
            return -1
        self._new += 1
        self.next += 1
        return self.next - 1

    def unclaimed(self) -> int:
        return sum(k not in self.seen for k in self.on_disk)


# ---------------------------------------------------------------- builder


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {k: 0.0 for k in ("source", "upscale", "au_detect", "caption", "write")}

    def iterate(self, it: Iterator, key: str) -> Iterator:
        """Charge the time spent producing each item of `it` to `key`."""
        it = iter(it)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.seconds[key] += time.perf_counter() - t
                return
            self.seconds[key] += time.perf_counter() - t
            yield item

    def call(self, key: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        self.seconds[key] += time.perf_counter() - t
        return out


def _expected(source) -> int | None:
    """How many records a source will give, when it says (len(), a `limit` or `num_images`)."""
    try:
        return len(source)
    except TypeError:
        for key in ("limit", "num_images"):
            if getattr(source.config, key, None) is not None:
                return getattr(source.config, key)
        return None


def build_fetext(recipe: FETextRecipe, registry=None, progress: bool = True) -> FETextSummary:
    """Stream every source through the stages into `recipe.output` (one writer at a time: see synfer.engine.lock)."""
    registry = registry or get_registry()
    sources = [build_stage(registry, "source", b, recipe.seed) for b in recipe.sources]
    upscaler = build_stage(registry, "upscaler", recipe.upscaler, recipe.seed)
    au_detector = build_stage(registry, "au_detector", recipe.au_detector, recipe.seed) if recipe.au_detector else None
    captioner = build_stage(registry, "captioner", recipe.captioner, recipe.seed)
    space = L.label_space(recipe.label_space)
    refuse_other_kind(recipe.output, "fetext")
    with OutputLock(recipe.output, "synfer fetext build"):
        return _build(recipe, sources, upscaler, au_detector, captioner, space, progress)


def _build(recipe, sources, upscaler, au_detector, captioner, space, progress) -> FETextSummary:
    from tqdm.auto import tqdm  # heavy

    writer = DatasetWriter(recipe.output)
    summary = FETextSummary(output=recipe.output, au_detector=getattr(au_detector, "name", None))
    timer = _Timer()
    start = time.perf_counter()

    expected = [_expected(s) for s in sources]
    total = sum(expected) if all(e is not None for e in expected) else None
    if recipe.limit is not None:
        total = min(total, recipe.limit) if total is not None else recipe.limit

    def process(batch):
        records = [r for _, r in batch]
        images = timer.call("upscale", upscaler.upscale, [r.image for r in records], recipe.size)
        for r, im in zip(records, images):
            r.image = im
        if au_detector is not None:  # None: a face the detector could not measure (AUDetector contract)
            for r, aus in zip(records, timer.call("au_detect", au_detector.detect, records)):
                r.aus = aus
                summary.unmeasured += aus is None
        for r, caption in zip(records, timer.call("caption", captioner.caption, records)):
            r.caption = caption
        rows = [(index, r.image, {
            "caption": r.caption,
            "expression": r.expression,
            "label": space.index(r.expression) if r.expression is not None else None,
            "aus": L.au_dict(L.au_vector(r.aus)) if r.aus is not None else None,
            "au_scale": L.AU_SCALE,
            "source": r.source,
            "identity": r.identity,
            "attributes": r.attributes,
        }) for index, r in batch]
        pending.append(pool.submit(write, rows))
        while len(pending) > 2:  # bounded queue: the sources never run far ahead of the disk
            pending.popleft().result()

    def write(rows):
        """In the one writer thread: PNG encoding and fsync overlap the next batch's rendering."""
        t = time.perf_counter()
        if hasattr(writer, "write_many"):  # one fsync per batch where the core writer offers it
            writer.write_many(rows)
        else:
            for index, image, meta in rows:
                writer.write(index, image, meta)
        timer.seconds["write"] += time.perf_counter() - t
        summary.written += len(rows)
        bar.update(len(rows))

    keys = KeyBook(writer.rows)
    batch: list = []
    pending: deque = deque()
    count = 0  # records of this build (new + already there), for `limit`
    with tqdm(total=total, desc="fetext", unit="img", disable=not progress) as bar, ThreadPoolExecutor(1) as pool:
        for source in sources:
            if recipe.limit is not None and count >= recipe.limit:
                break
            for record in timer.iterate(source.records(), "source"):
                if record.expression is not None:
                    record.expression = L.canonical(record.expression)
                    if record.expression not in space:
                        summary.filtered[f"{record.expression} not in {recipe.label_space}"] += 1
                        continue
                index = keys.claim(record)
                if index is None:
                    summary.filtered["same source and file as an earlier record"] += 1
                    continue
                if index < 0:
                    summary.resumed += 1
                    bar.update(1)
                else:
                    batch.append((index, record))
                    if len(batch) >= recipe.batch_size:
                        process(batch)
                        batch = []
                count += 1
                if recipe.limit is not None and count >= recipe.limit:
                    break
            summary.skipped += list(getattr(source, "skipped", []))
            summary.filtered.update(getattr(source, "filtered", {}))
        if batch:
            process(batch)
        while pending:
            pending.popleft().result()
    if recipe.limit is None:  # every source read to its end: what is on disk and no longer given is known
        summary.gone = keys.unclaimed()
    summary.inserted = keys.inserted

    summary.seconds = timer.seconds
    summary.wall_s = time.perf_counter() - start
    summary.total = len(writer.rows)
    if summary.total == 0:  # nothing to train on: say why, rather than an empty dataset and exit 0
        raise NoFaces(summary)
    summary.per_class = Counter(str(r.get("expression")) for r in writer.rows)
    summary.per_source = Counter(str(r.get("source")) for r in writer.rows)

    atomic_write(Path(recipe.output) / SUMMARY_FILE, json.dumps(summary.as_dict(), indent=2) + "\n")
    return summary


# ---------------------------------------------------------------- CLI


def _load(recipe, overrides):
    try:
        return load_fetext_recipe(recipe, overrides)
    except RecipeError as exc:
        raise click.ClickException(str(exc))


@click.group(name="fetext")
def fetext_cli():
    """FEText (paper 4.2.1): build the image-text-AU dataset the generator is fine-tuned on."""


@fetext_cli.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--no-progress", is_flag=True, help="No progress bar (logs, CI).")
@threads_option
def build(recipe, overrides, no_progress, threads):
    """Build FEText from a recipe; a rerun resumes.

    OVERRIDES are key=value pairs, e.g. output=out/x limit=100 sources.0.limit=50
    """
    r = _load(recipe, overrides)
    configure_threads(threads)
    click.echo(build_fetext(r, progress=not no_progress).table())


@fetext_cli.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
def validate(recipe, overrides):
    """Check a FEText recipe without reading any data or weights."""
    r = _load(recipe, overrides)
    click.echo(f"{recipe}: ok ({len(r.sources)} source(s) -> {r.output} at {r.size}x{r.size})")
