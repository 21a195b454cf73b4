"""The downstream benchmark behind `synfer benchmark downstream RECIPE` (synfer.commands.benchmark): does the synthetic set help a FER model on real faces? (paper 5.2, Fig. 6)

The same small FER classifier (`classifier:`, a registered guidance classifier that is also a
synfer.contract.stages.TrainableClassifier; default the built-in tiny-cnn) is trained on
(a) real only, (b) synthetic only and (c) real + synthetic, with the synthetic set at
several multiples of the real set's size, for several seeds, and tested on a held-out real
set (and, when `real_test_2` names one, on a second held-out split built with another seed:
every trained model is scored on both, and no setting was chosen on the second). Every
training gets the same number of steps, so a setting wins by its data, not by a longer
schedule. `real_per_class` picks the regime (50: data-scarce; 250: data-rich). Writes
`downstream.json` and `downstream.png` (accuracy and UAR vs synthetic scale, a line per
setting, a band for real only) and prints a table. `synfer benchmark ssl` (synfer.commands.selfsup)
adds the self-supervised paradigm in the same format.
"""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Literal

import click
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from synfer.contract import labels as L
from synfer.contract.contracts import calling
from synfer.contract.stages import TrainableClassifier
from synfer.engine.arrays import load_arrays, soft_targets
from synfer.engine.dataset import write_json
from synfer.engine.recipe import LabelSpaceName, RecipeModel, read_yaml, validate_recipe
from synfer.engine.registry import PluginError, get_registry
from synfer.engine.scoring import classification_scores
from synfer.engine.seeds import stream_rng

SSL_SETTINGS = ("ssl-real", "ssl-synthetic", "ssl-real+synthetic")

class SSLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(300, gt=0)  # SimCLR optimiser steps, the same for every pretraining set
    batch_size: int = Field(64, ge=2)  # images per step (2 views each: 2 x batch_size through the encoder)
    lr: float = Field(2e-3, gt=0)  # AdamW
    temperature: float = Field(0.2, gt=0)  # NT-Xent temperature
    width: int = Field(32, ge=4)  # encoder channels (features: 2 x width)
    proj_dim: int = Field(64, gt=0)  # projection head output
    crop_area: float = Field(0.35, gt=0, le=1)  # smallest area share of a random resized crop (1: the whole face, aspect still jittered)
    scales: list[float] = [1]  # synthetic pretraining images = scale x the real set
    settings: list[str] = list(SSL_SETTINGS)  # pretraining sets: real, synthetic, both
    probe_iters: int = Field(500, gt=0)  # full-batch steps of the linear probe
    probe_weight_decay: float = Field(1e-3, ge=0)  # L2 on the probe's weights

    @field_validator("settings")
    @classmethod
    def _settings(cls, v):
        bad = [s for s in v if s not in SSL_SETTINGS]
        if bad or not v:
            raise ValueError(f"settings must be a non-empty subset of {list(SSL_SETTINGS)}, got {v}")
        return v

    _scales = field_validator("scales")(classmethod(lambda cls, v: positive_scales(v)))

def positive_scales(v: list[float]) -> list[float]:
    """The `scales` check shared by the downstream and SSL configs (multiples of the real set's size)."""
    if not v or min(v) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive multiples, got {v}")
    return v


SETTINGS = ("real", "synthetic", "real+synthetic")


class DownstreamConfig(RecipeModel):

    real_train: str  # FEText-format folder (metadata.jsonl with `expression`)
    synthetic: str  # a generated dataset (final `label`, `kept`)
    real_test: str  # held-out real set, FEText format
    real_test_2: str | None = None  # a second held-out split (another seed); the same models are scored on it too
    label_space: LabelSpaceName = "affectnet8"
    classifier: str = "tiny-cnn"  # a guidance classifier plugin that can be trained from arrays (TrainableClassifier)
    real_per_class: int = Field(50, gt=0)  # real training images per class (50: the data-scarce regime; 250: data-rich)
    scales: list[float] = [1, 2, 5]  # synthetic images per class = scale x real_per_class
    seeds: list[int] = [0, 1, 2]  # each seed redraws the subsets and the initialisation
    iters: int = Field(3200, gt=0)  # optimiser steps per training (same for every setting; 800 left the rows under-trained)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    size: int = Field(32, ge=16)  # training/test input size (32 keeps a 3,200-step training at ~2 CPU minutes)
    width: int = Field(16, gt=0)  # tiny_cnn width
    settings: list[Literal["real", "synthetic", "real+synthetic"]] = list(SETTINGS)  # which rows to train
    synthetic_kept_only: bool = True  # train only on samples the calibration kept
    synthetic_min_confidence: float | None = Field(None, gt=0, le=1)  # drop synthetic samples whose soft label's top probability is lower
    synthetic_targets: Literal["label", "soft_label"] = "soft_label"  # the calibrated soft labels (paper 4.4) or the final class;
    # real images keep their one-hot class. soft_label: +3.2 points at 1x in both regimes (docs/results.md)
    mix: Literal["concat", "balanced"] = "balanced"  # real+synthetic: real repeated to the synthetic count (half of each batch), or one pool
    allow_short: bool = False  # true: train on what there is when a class has fewer images than a scale asks for
    test_limit: int | None = Field(None, gt=0)
    threads: int | None = Field(None, gt=0)  # torch.set_num_threads
    output: str | None = None  # folder for downstream.json/png; default: the synthetic dataset folder
    ssl: SSLConfig = SSLConfig()  # `synfer benchmark ssl`: SimCLR pretraining + linear probe (synfer.commands.selfsup)

    _scales = field_validator("scales")(classmethod(lambda cls, v: positive_scales(v)))


def load_config(path: str | Path, overrides=()) -> DownstreamConfig:
    problems: list[str] = []
    data = read_yaml(path, overrides, problems)
    return validate_recipe(DownstreamConfig, data, source=str(path), problems=problems)


def per_class_subset(y, per_class: int, rng):
    """Indices of up to `per_class` samples of every class (fewer where a class has fewer)."""
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        out.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def scores(y_true, y_pred, num_classes: int) -> dict[str, float]:
    """Accuracy (WAR) and unweighted average recall over the classes present in the test set."""
    return classification_scores(y_true, y_pred, num_classes)


def trainable(name: str):
    """The classifier plugin the benchmark trains, through the registry (the core imports no plugin)."""
    try:
        cls = get_registry().get("guidance_classifier", name)
    except PluginError as exc:
        raise click.ClickException(f"classifier: {exc}")
    if not issubclass(cls, TrainableClassifier):
        raise click.ClickException(f"classifier: {cls.kind} {name!r} ({cls.__module__}) cannot be trained from arrays; "
                                   "expected a synfer.contract.stages.TrainableClassifier such as tiny-cnn")
    return cls


def train_and_test(cfg: DownstreamConfig, x, y, tests: dict, seed: int) -> dict[str, float]:
    """Train one classifier; scores on every test split (`tests`: prefix -> (x, y); prefix "" is the main split)."""
    cls = trainable(cfg.classifier)
    log = io.StringIO()
    try:  # 21 trainings' runner logs would bury the table: keep them unless a training fails
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), calling(cls, "fit_arrays"):
            predict = cls.fit_arrays(x, y, len(L.label_space(cfg.label_space)), iters=cfg.iters, batch_size=cfg.batch_size, lr=cfg.lr,
                                     seed=seed, size=cfg.size, width=cfg.width, threads=cfg.threads)
    except Exception:
        print(log.getvalue())
        raise
    out = {}
    for prefix, (xt, yt) in tests.items():
        out.update({prefix + k: v for k, v in scores(yt, predict(xt).argmax(1), len(L.label_space(cfg.label_space))).items()})
    return out


def load_sets(cfg: DownstreamConfig, echo=print):
    """(x_real, y_real), (x_syn, y_syn, p_syn), tests {prefix: (x, y)}: the folders as arrays, with the synthetic filters
    applied; p_syn: the soft labels (N, classes) when `synthetic_targets: soft_label`, else None."""
    t0 = time.time()
    x_real, y_real, _, _ = load_arrays(cfg.real_train, cfg.label_space, cfg.size, kept_only=True, label_key="expression")
    x_syn, y_syn, _, rows = load_arrays(cfg.synthetic, cfg.label_space, cfg.size, kept_only=cfg.synthetic_kept_only)
    p_syn = soft_targets(rows, y_syn, len(L.label_space(cfg.label_space))) if cfg.synthetic_targets == "soft_label" else None
    if cfg.synthetic_min_confidence is not None:
        conf = np.array([max(r.get("soft_label") or [1.0]) for r in rows])
        keep = conf >= cfg.synthetic_min_confidence
        x_syn, y_syn, p_syn = x_syn[keep], y_syn[keep], (p_syn[keep] if p_syn is not None else None)
    tests = {"": load_arrays(cfg.real_test, cfg.label_space, cfg.size, kept_only=True, label_key="expression", limit=cfg.test_limit)[:2]}
    if cfg.real_test_2:
        tests["test2_"] = load_arrays(cfg.real_test_2, cfg.label_space, cfg.size, kept_only=True, label_key="expression", limit=cfg.test_limit)[:2]
    named = [("real_train", y_real), ("synthetic", y_syn)] + [("real_test_2" if k else "real_test", v[1]) for k, v in tests.items()]
    for name, y in named:
        if len(y) == 0:
            raise click.ClickException(f"{name} ({getattr(cfg, name)}) has no images with labels in {cfg.label_space}")
    echo(f"loaded {len(y_real)} real, {len(y_syn)} synthetic, " + ", ".join(f"{len(v[1])} test{k[4:5] or ''}" for k, v in tests.items())
         + f" images at {cfg.size}x{cfg.size} ({time.time() - t0:.1f} s)")
    return (x_real, y_real), (x_syn, y_syn, p_syn), tests


def check_coverage(cfg: DownstreamConfig, y_real, y_syn, scales, echo=print) -> list[str]:
    """Every class of the real set must hold real_per_class real images and max(scale) x real_per_class synthetic ones,
    else a row would silently train on fewer (and on a class mix other than asked). Returns the shortfalls."""
    n = len(L.label_space(cfg.label_space))
    present = np.flatnonzero(np.bincount(y_real, minlength=n))  # the classes of the real set (of the protocol)
    short = []
    for name, y, need in (("real_train", y_real, cfg.real_per_class),
                          ("synthetic", y_syn, int(round(max(scales, default=0) * cfg.real_per_class)))):
        have = np.bincount(y, minlength=n)
        low = [f"{L.label_space(cfg.label_space)[c]} {have[c]}" for c in present if have[c] < need]
        if need and low:
            short.append(f"{name} ({getattr(cfg, name)}) has fewer than {need} images in: {', '.join(low)}")
    if short and not cfg.allow_short:
        raise click.ClickException("; ".join(short) + ". Expected every class to cover real_per_class x the largest scale. "
                                   "Generate more (a larger num_images resumes the run), lower `scales`/`real_per_class`, "
                                   "or set allow_short=true to train on what there is (rows record their real image counts).")
    for line in short:
        echo(f"warning: {line} (allow_short: rows train on fewer)")
    return short


def compose(setting, x_real, y_real, x_syn, y_syn, mix: str, p_syn=None):
    """The training arrays of a setting; `balanced` repeats the real images to about the synthetic count.
    With soft labels `p_syn` the targets of a setting with synthetic images are (N, classes) probabilities."""
    if setting == "real" or len(y_syn) == 0:
        return x_real, y_real
    if p_syn is not None:
        y_real, y_syn = np.eye(p_syn.shape[1], dtype=np.float32)[y_real], p_syn
    if setting == "synthetic":
        return x_syn, y_syn
    reps = max(1, int(round(len(y_syn) / max(len(y_real), 1)))) if mix == "balanced" else 1
    return np.concatenate([x_real] * reps + [x_syn]), np.concatenate([y_real] * reps + [y_syn])


def run_downstream(cfg: DownstreamConfig, echo=print) -> dict:
    """All trainings; returns the downstream.json content (and writes it, with the plot)."""
    import torch  # heavy

    trainable(cfg.classifier)  # before the images load: a wrong name fails at once
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    (x_real, y_real), (x_syn, y_syn, p_syn), tests = load_sets(cfg, echo)
    plan = ([("real", 0.0)] if "real" in cfg.settings else []) + [(s, k) for s in SETTINGS[1:] if s in cfg.settings for k in cfg.scales]
    short = check_coverage(cfg, y_real, y_syn, [k for _, k in plan], echo)
    runs = []
    for seed in cfg.seeds:
        rng = stream_rng(seed, "benchmark.real")
        real_idx = per_class_subset(y_real, cfg.real_per_class, rng)
        for setting, scale in plan:
            # one permutation per seed: the 2x synthetic subset contains the 1x one
            syn_idx = per_class_subset(y_syn, int(round(scale * cfg.real_per_class)), stream_rng(seed, "benchmark.synthetic")) if scale else []
            x, y = compose(setting, x_real[real_idx], y_real[real_idx], x_syn[syn_idx], y_syn[syn_idx], cfg.mix,
                           p_syn[syn_idx] if p_syn is not None else None)
            t = time.time()
            res = train_and_test(cfg, x, y, tests, seed)
            run = {"setting": setting, "scale": scale, "seed": seed, "train_images": int(len(y)),
                   "synthetic_images": int(len(syn_idx)), **res, "seconds": round(time.time() - t, 2)}
            runs.append(run)
            extra = f"  | test2 acc {res['test2_accuracy']:.3f} uar {res['test2_uar']:.3f}" if "test2_accuracy" in res else ""
            echo(f"  seed {seed} {setting:<15} x{scale:<4g} {len(y):>5} imgs  acc {res['accuracy']:.3f}  uar {res['uar']:.3f}{extra}  ({run['seconds']:.1f} s)")
    counts = {"real_train": int(len(y_real)), "synthetic": int(len(y_syn)), "real_test": int(len(tests[""][1]))}
    if "test2_" in tests:
        counts["real_test_2"] = int(len(tests["test2_"][1]))
    result = {"config": cfg.model_dump(), "runs": runs, "summary": summarize(runs), "seconds": round(time.time() - t0, 1),
              "counts": counts, "short": short}
    return write_result(result, Path(cfg.output or cfg.synthetic))


def write_result(result: dict, out: Path) -> dict:
    """downstream.json + downstream.png into `out` (run, merge)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "downstream.json", result)
    plot_downstream(result, out / "downstream.png")
    return result


METRICS = ("accuracy", "uar", "test2_accuracy", "test2_uar")


def setting_order(setting: str) -> tuple[int, str]:
    known = SETTINGS + SSL_SETTINGS
    return (known.index(setting), "") if setting in known else (len(known), setting)


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds per (setting, scale), of every metric the runs carry (the second split's too)."""
    keys = sorted({(r["setting"], r["scale"]) for r in runs}, key=lambda k: (setting_order(k[0]), k[1]))
    out = []
    for setting, scale in keys:
        rs = [r for r in runs if r["setting"] == setting and r["scale"] == scale]
        row = {"setting": setting, "scale": scale, "seeds": len(rs), "train_images": int(np.mean([r["train_images"] for r in rs]))}
        for m in (m for m in METRICS if all(m in r for r in rs)):
            v = np.array([r[m] for r in rs])
            row[f"{m}_mean"], row[f"{m}_std"] = float(v.mean()), float(v.std())
        out.append(row)
    return out


def table(result: dict) -> str:
    two = any("test2_accuracy_mean" in r for r in result["summary"])
    lines = [f"{'setting':<20}{'scale':>6}{'images':>8}{'accuracy':>17}{'UAR':>17}" + (f"{'split 2 acc':>17}{'split 2 UAR':>17}" if two else "")]
    for r in result["summary"]:
        scale = "-" if r["scale"] == 0 else f"{r['scale']:g}x"
        cells = "".join(f"{r[f'{m}_mean']:>10.3f} ± {r[f'{m}_std']:.3f}" for m in METRICS[:4 if two else 2] if f"{m}_mean" in r)
        lines.append(f"{r['setting']:<20}{scale:>6}{r['train_images']:>8}{cells}")
    lines.append(f"({len(result['runs'])} trainings, {result['seconds']:.0f} s in all; mean ± std over seeds)")
    return "\n".join(lines)


def plot_downstream(result: dict, path):
    """Fig. 6 style: accuracy and UAR vs synthetic scale; real-only as a horizontal band; the second
    held-out split (when scored) in dotted lines of the same colours."""
    import matplotlib  # heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy

    summary = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for ax, m, title in zip(axes, ("accuracy", "uar"), ("accuracy", "UAR")):
        for r in (r for r in summary if r["scale"] == 0):
            lo, hi = r[f"{m}_mean"] - r[f"{m}_std"], r[f"{m}_mean"] + r[f"{m}_std"]
            ax.axhspan(lo, hi, color="0.6", alpha=0.3, lw=0)
            ax.axhline(r[f"{m}_mean"], color="0.3", ls="--", label=f"{r['setting']} only ({r['train_images']} imgs)")
            if f"test2_{m}_mean" in r:
                ax.axhline(r[f"test2_{m}_mean"], color="0.3", ls=":", label="(dotted: split 2)")
        for i, setting in enumerate(sorted({r["setting"] for r in summary if r["scale"]}, key=setting_order)):
            rs = [r for r in summary if r["setting"] == setting and r["scale"]]
            kw = dict(color=f"C{i}", capsize=3)
            ax.errorbar([r["scale"] for r in rs], [r[f"{m}_mean"] for r in rs], yerr=[r[f"{m}_std"] for r in rs],
                        fmt="os^v"[i % 4] + "-", label=f"{setting} only" if setting == "synthetic" else setting, **kw)
            if all(f"test2_{m}_mean" in r for r in rs):
                ax.plot([r["scale"] for r in rs], [r[f"test2_{m}_mean"] for r in rs], ":", color=f"C{i}")
        ax.set_xlabel("synthetic images (x real set size)")
        ax.set_ylabel(f"test {title} (real)")
        ax.set_xticks(sorted({r["scale"] for r in summary if r["scale"]}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    cfg = result.get("config", {})
    fig.suptitle(f"Downstream FER on held-out real faces ({cfg.get('real_per_class', '?')} real/class, {len(cfg.get('seeds', []))} seeds)", fontsize=10)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def training_count(seeds, settings, scales, alone: str) -> int:
    """How many models a benchmark trains: per seed, the setting without synthetic data (`alone`) once,
    every other setting once per scale."""
    return len(seeds) * ((alone in settings) + (len(settings) - (alone in settings)) * len(scales))


# config keys that may differ between runs that merge: which rows ran, where, on how many threads
MERGE_FREE = {"settings", "scales", "output", "threads"}


def merge_results(results: list[dict]) -> dict:
    """One downstream.json from several runs on the same data (e.g. `settings=[real,synthetic]` and
    `settings=[real+synthetic]` run side by side). Each row's subsets and initialisation come from
    (seed, row) alone, so the merge holds exactly the rows one run of them all would."""
    base = {k: v for k, v in results[0]["config"].items() if k not in MERGE_FREE}
    for r in results[1:]:
        diff = sorted(k for k in set(base) | set(r["config"]) if k not in MERGE_FREE and r["config"].get(k) != base.get(k))
        if diff:
            raise ValueError(f"these runs did not use the same data or protocol: they differ in {', '.join(diff)}; "
                             "merge only runs of one recipe that differ in settings, scales, output or threads")
    runs, seen = [], set()
    for r in results:
        for run in r["runs"]:
            key = (run["setting"], run["scale"], run["seed"])
            if key in seen:
                raise ValueError(f"the row {run['setting']} {run['scale']:g}x seed {run['seed']} is in more than one run; "
                                 "merge runs of different settings or scales")
            seen.add(key)
            runs.append(run)
    config = {**results[0]["config"],
              "settings": [s for s in SETTINGS if any(s in r["config"]["settings"] for r in results)],
              "scales": sorted({k for r in results for k in r["config"]["scales"]})}
    return {"config": config, "runs": runs, "summary": summarize(runs),
            "seconds": round(sum(r["seconds"] for r in results), 1), "counts": results[0]["counts"],
            "short": sorted({s for r in results for s in r["short"]})}
