"""The run loop of `synfer run`: plan -> generate -> calibrate -> write -> evaluate.

Stages are plain objects called through their typed methods. Every sample's
randomness derives from (recipe seed, sample index), and the plan is split in whole chunks
of the generator's `chunk` indices (the shape its batches always have), so the output does
not depend on the batch size, the number of workers, or an interruption and resume.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from synfer.contract import labels as L
from synfer.contract.contracts import Guarded, calling, label_space_of
from synfer.contract.guidance_contract import GuardedClassifier
from synfer.contract.stages import LabelledSample, SampleRequest
from synfer.engine.align import aligned_predict
from synfer.engine.card import write_card
from synfer.engine.dataset import DatasetWriter, atomic_write, iter_rows, merge, part_name, write_json
from synfer.engine.ensemble import ExpertEnsemble, Member
from synfer.engine.evaluate import EvaluationError, run_evaluators
from synfer.engine.faults import crash_point
from synfer.engine.lock import OutputLock
from synfer.engine.peers import Peers, distributed
from synfer.engine.recipe import Recipe, expert_kind
from synfer.engine.registry import Registry, get_registry
from synfer.engine.resume import check_resume
from synfer.engine.seeds import stream_rng

GOLDEN = (math.sqrt(5) - 1) / 2


def expression_for(index: int, mix: dict[str, float]) -> str:
    """Deterministic, well-spread class for a sample index (a low-discrepancy walk over the mix),
    so any prefix of the plan is close to the asked proportions."""
    u = (index * GOLDEN) % 1.0
    acc = 0.0
    for name, w in mix.items():
        acc += w
        if u < acc:
            return name
    return next(reversed(mix))


def plan(recipe: Recipe, limit: int | None = None) -> list[SampleRequest]:
    """Per-sample seed, expression and AU vector (FAU-FE prior); prompts come from the prompter."""
    n = recipe.num_images if limit is None else min(limit, recipe.num_images)
    return list(iter_plan(recipe, range(n)))


def iter_plan(recipe: Recipe, indices) -> Iterator[SampleRequest]:
    """The plan of `indices`, one request at a time (a plan of 10**12 samples is never held in memory)."""
    prior = L.AUPrior(**recipe.au_prior.model_dump())
    mix = recipe.mix()
    for index in indices:
        seed = L.sample_seed(recipe.seed, index)
        expression = expression_for(index, mix)
        aus = prior.sample(expression, stream_rng(seed, "plan.aus"))
        yield SampleRequest(index=index, seed=seed, expression=expression, aus=L.au_dict(aus))


def shard(n: int, chunk: int, rank: int, world: int) -> Iterator[int]:
    """The sample indices of rank `rank` of `world`: chunks k = [k*chunk, (k+1)*chunk) with k % world == rank,
    so a chunk is never split between workers and N workers produce exactly what one would."""
    for k in range(rank, -(-n // chunk), world):
        yield from range(k * chunk, min((k + 1) * chunk, n))


def shard_size(n: int, chunk: int, rank: int, world: int) -> int:
    """How many indices `shard` yields, without walking them."""
    chunks = -(-n // chunk)
    size = len(range(rank, chunks, world)) * chunk
    return size - (chunks * chunk - n if chunks and (chunks - 1) % world == rank else 0)


@dataclass
class RunSummary:
    output: str
    planned: int
    generated: int
    resumed: int
    seconds: float
    per_class: dict[str, Counter] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    failed: int = 0  # samples the generator could not produce (non-finite output after retries)

    def table(self) -> str:
        lines = [f"{self.output}: {self.planned} planned, {self.generated} generated now, {self.resumed} already on disk, {self.seconds:.1f} s"]
        if self.failed:
            lines.append(f"{self.failed} sample(s) failed (non-finite output after retries) and were not written; see the log")
        if self.per_class:
            lines.append(f"{'class':<10}{'total':>7}{'kept':>7}{'relabelled':>12}{'dropped':>9}")
            tot = Counter()
            for c, k in self.per_class.items():
                tot.update(k)
                lines.append(f"{c:<10}{k['total']:>7}{k['kept']:>7}{k['relabelled']:>12}{k['dropped']:>9}")
            lines.append(f"{'all':<10}{tot['total']:>7}{tot['kept']:>7}{tot['relabelled']:>12}{tot['dropped']:>9}")
        for k, v in self.metrics.items():
            lines.append(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
        return "\n".join(lines)


def calibration_counts(rows: list[dict]) -> dict[str, Counter]:
    """Per preassigned class: total, kept, relabelled, dropped."""
    out: dict[str, Counter] = {}
    for r in rows:
        c = out.setdefault(r["preassigned_label"], Counter())
        c["total"] += 1
        if not r.get("kept", True):
            c["dropped"] += 1
        else:
            c["kept"] += 1
            c["relabelled"] += r["label"] != r["preassigned_label"]
    return dict(sorted(out.items()))


class Stages:
    """Every stage a recipe names, built once (weights load lazily inside plugins)."""

    def __init__(self, recipe: Recipe, registry=None):
        reg = registry or get_registry()
        self.registry = reg
        # stages as the core calls them: errors raised inside name their plugin (synfer.contract.contracts)
        self.prompter = Guarded(reg.build("prompter", recipe.prompter), "prompt")
        generator = reg.build("generator", recipe.generator)
        self.generator = Guarded(generator, "generate")
        self.guidance = None
        if recipe.guidance_classifier:  # the generator sees it through its checked boundary
            self.guidance = GuardedClassifier(self._on_generator_device(reg.build("guidance_classifier", recipe.guidance_classifier)))
        members = []
        if recipe.calibrator:
            cal = self._on_generator_device(reg.build("calibrator", recipe.calibrator))
            with calling(cal, "bind"):
                cal.bind(generator)
            members.append(Member(cal.name, recipe.vote.calibrator_weight, label_space_of(cal), cal.predict, cal, cal.outputs))

        for block in recipe.experts:
            block = dict(block)
            weight = float(block.pop("weight", 1.0))
            align = block.pop("align", None)  # detect and align faces before this expert sees them
            expert = self._on_generator_device(reg.build(expert_kind(reg, block["plugin"]), block))
            name = expert.name
            while any(m.name == name for m in members):  # the same plugin twice (e.g. two checkpoints)
                name = f"{expert.name}#{sum(m.name.split('#')[0] == expert.name for m in members) + 1}"
            predict = aligned_predict(expert.predict, align, reg)
            members.append(Member(name, weight, label_space_of(expert), lambda samples, p=predict: p([s.image for s in samples]),
                                  expert, getattr(expert, "outputs", "probabilities")))
        self.ensemble = ExpertEnsemble(members, recipe.label_space, recipe.vote)
        self.evaluators = [Guarded(reg.build("evaluator", b), "evaluate") for b in recipe.evaluators]

    def _on_generator_device(self, stage):
        """A stage whose Config has a `device` the recipe left unset runs where the generator runs (no CPU
        classifier reading CUDA images in guidance; experts and calibrator beside the UNet)."""
        cfg = stage.config
        if "device" in type(cfg).model_fields and "device" not in cfg.model_fields_set:
            stage.config = cfg.model_copy(update={"device": self.generator.target_device()})
        return stage


def label_batch(stages: Stages, samples, classes) -> list[LabelledSample]:
    votes = stages.ensemble(samples, [s.request.expression for s in samples])
    crash_point("calibrate")
    out = []
    for s, (v, preds) in zip(samples, votes):
        out.append(LabelledSample(sample=s, preassigned_label=s.request.expression, label=classes[v.label],
                                  soft_label=list(v.soft), agreement=v.agreement, kept=v.kept,
                                  predictions={k: list(p) for k, p in preds.items()}))
    return out


def run_recipe(recipe: Recipe, limit: int | None = None, registry: Registry | None = None, progress: bool = True,
               force: bool = False, finish: Callable[[Path], object] | None = None) -> RunSummary:
    """Generate, label and write every planned sample not yet on disk, then merge, summarise, evaluate.

    Under torchrun each rank takes the chunks `(index // chunk) % world == rank` and appends to its own
    metadata part; rank 0 merges once every rank sent its counts (`Peers`) and runs the summary steps alone. Every step
    after generation rewrites its file whole (atomically), so a rerun after a crash ends with the
    same files as an uninterrupted run. A rerun whose recipe would draw other samples than the
    one recorded in `<output>/recipe.json` stops (synfer.engine.resume); `force` continues anyway.
    `finish(output)` runs on rank 0 after the metrics when the recipe asks for a report (`synfer run` writes
    report.html there; the engine knows no commands).
    """
    t0 = time.time()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = Path(recipe.output)
    peers = distributed(world, rank)  # before the lock: a rank that cannot take it stops the others too
    try:
        with OutputLock(out, "synfer run", rank=rank):  # a FEText folder as output: synfer.engine.resume.check_resume refuses it
            summary = _run(RankRun(recipe, out, limit, registry, progress, force, finish, rank, world, t0, peers))
        if peers is not None:
            peers.finish()
    except BaseException as exc:
        if peers is not None:
            peers.fail(exc)
        raise
    return summary


@dataclass(frozen=True)
class RankRun:
    """Everything one rank's `_run` reads: the recipe and the caller's choices, this rank's place, its peers."""

    recipe: Recipe
    out: Path
    limit: int | None
    registry: Registry | None
    progress: bool
    force: bool
    finish: Callable[[Path], object] | None
    rank: int
    world: int
    t0: float
    peers: Peers | None


def _run(run: RankRun) -> RunSummary:
    from tqdm.auto import tqdm  # heavy

    recipe, out, rank, world = run.recipe, run.out, run.rank, run.world
    stages = Stages(recipe, run.registry)  # first: a stage that cannot be built leaves no recipe.json and no images/ behind
    check_resume(recipe, out, iter_rows(out), force=run.force, registry=run.registry, write=rank == 0)  # before anything is written
    writer = DatasetWriter(out, part=part_name(rank) if world > 1 else None, images_per_folder=recipe.images_per_folder)
    n = recipe.num_images if run.limit is None else min(run.limit, recipe.num_images)
    classes = L.label_space(recipe.label_space)
    chunk = max(1, int(stages.generator.chunk or 1))  # the generator's batch shape (synfer.contract.stages.Generator)
    mine = shard_size(n, chunk, rank, world)
    done_mine = sum(1 for i in writer.done if i < n and (i // chunk) % world == rank)
    todo_plan = iter_plan(recipe, (i for i in shard(n, chunk, rank, world) if i not in writer.done))  # lazy
    todo = (list(g) for _, g in itertools.groupby(todo_plan, key=lambda r: r.index // chunk))  # one list per chunk
    per_call = -(-stages.generator.batch_size // chunk)  # whole chunks per generate() call
    generated = failed = 0
    with tqdm(total=mine - done_mine, desc=f"generate (rank {rank}/{world})" if world > 1 else "generate", unit="img",
              disable=not run.progress or (rank != 0 and world > 1)) as bar:
        while batch := [r for rs in itertools.islice(todo, per_call) for r in rs]:
            if run.peers is not None:
                run.peers.check()  # a rank that failed meanwhile stops this one now, with its error
            for r, p in zip(batch, stages.prompter.prompt(batch)):
                r.prompt = p
            samples = stages.generator.generate(batch, guidance=stages.guidance)
            failed += len(batch) - len(samples)  # dropped by the generator (non-finite even after retries)
            crash_point("generate")
            if samples:
                # label chunk by chunk: the experts' and calibrator's batch shapes (and so their float rounding,
                # kept in metadata.jsonl) then do not depend on how many chunks one generate() call ran
                by_chunk = (list(g) for _, g in itertools.groupby(samples, key=lambda s: s.request.index // chunk))
                writer.write_many([(ls.sample.request.index, ls.sample.image, ls.metadata(""))
                                   for group in by_chunk for ls in label_batch(stages, group, classes)])
            generated += len(samples)
            bar.update(len(batch))
            bar.set_postfix(img_s=f"{generated / max(time.time() - run.t0, 1e-9):.2f}", **({"failed": failed} if failed else {}))
    resumed = done_mine
    if run.peers is not None:  # totals over ranks; rank 0 merges and summarises once everyone is done
        generated, resumed, failed = run.peers.gather([generated, resumed, failed])
        if rank != 0:
            return RunSummary(str(out), n, generated, resumed, time.time() - run.t0, failed=failed)
    rows = merge(out)
    summary = RunSummary(str(out), n, generated, resumed, 0.0, calibration_counts(rows), failed=failed)
    write_json(out / "calibration.json", {k: dict(v) for k, v in summary.per_class.items()})
    if recipe.grid and rows:
        write_grid(out, rows, classes)
    failed_eval = None
    if stages.evaluators:  # metrics.json keeps what an earlier `synfer eval` wrote, and says which judge made each number
        try:
            summary.metrics.update(run_evaluators(out, list(zip(recipe.evaluators, stages.evaluators))))
        except EvaluationError as exc:  # the dataset and the other metrics are written; the report still follows
            failed_eval = exc
    if recipe.report and rows and run.finish is not None:
        run.finish(out)  # the command's report (synfer.commands.report), before the card that lists the files
    write_card(out, recipe, stages.registry)
    if failed_eval is not None:
        raise failed_eval
    summary.seconds = time.time() - run.t0
    return summary


def write_grid(out: Path, rows: list[dict], classes, per_class: int = 8, name: str = "grid.png", path: Path | None = None) -> Path:
    """A grid PNG: one row per expression (final label), up to `per_class` images each."""
    from PIL import Image, ImageDraw  # heavy

    by = {c: [] for c in classes}  # one pass over the rows, stopped once every class is full (a million rows are not all read)
    for r in rows:
        got = by.get(r.get("label")) if r.get("kept", True) else None
        if got is not None and len(got) < per_class:
            got.append(r)
            if all(len(v) == per_class for v in by.values()):
                break
    by = {c: v for c, v in by.items() if v}
    with Image.open(out / rows[0]["file_name"]) as im:
        size = max(im.size[0], 64)  # small (32 px) samples are shown enlarged, pixels kept sharp
    label_w = 64
    grid = Image.new("RGB", (label_w + per_class * size, max(1, len(by)) * size), "white")
    draw = ImageDraw.Draw(grid)
    for y, (c, rs) in enumerate(by.items()):
        draw.text((2, y * size + size // 2 - 5), c, fill="black")
        for x, r in enumerate(rs):
            with Image.open(out / r["file_name"]) as im:
                grid.paste(im.convert("RGB").resize((size, size), Image.NEAREST), (label_w + x * size, y * size))
    path = path or out.parent / f"{out.name}-{name}"  # beside the folder: imagefolder loaders see only the samples
    atomic_write(path, lambda f: grid.save(f, format="PNG"), sync=False)  # a kill mid-save leaves the old grid, never half a PNG
    return path
