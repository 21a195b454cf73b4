"""`synfer benchmark downstream RECIPE`: does the synthetic set help a FER model on real faces? (paper 5.2, Fig. 6)

The same small FER classifier (`classifier:`, a registered guidance classifier that is also a
synfer.stages.TrainableClassifier; default the built-in tiny-cnn) is trained on
(a) real only, (b) synthetic only and (c) real + synthetic, with the synthetic set at
several multiples of the real set's size, for several seeds, and tested on a held-out real
set. Every training gets the same number of steps, so a setting wins by its data, not by a
longer schedule. Writes `downstream.json` and `downstream.png` (accuracy vs synthetic scale,
a line per setting, a band for real only) and prints a table.
"""
from __future__ import annotations

import time
from pathlib import Path

import click
from pydantic import Field, field_validator

from synfer import labels as L
from synfer.dataset import write_json
from synfer.recipe import LabelSpaceName, RecipeModel
from synfer.seeds import stream_rng

SETTINGS = ("real", "synthetic", "real+synthetic")


class DownstreamConfig(RecipeModel):

    real_train: str  # FEText-format folder (metadata.jsonl with `expression`)
    synthetic: str  # a generated dataset (final `label`, `kept`)
    real_test: str  # held-out real set, FEText format
    label_space: LabelSpaceName = "affectnet8"
    classifier: str = "tiny-cnn"  # a guidance classifier plugin that can be trained from arrays (TrainableClassifier)
    real_per_class: int = Field(50, gt=0)  # real training images per class (the data-scarce regime)
    scales: list[float] = [1, 2, 5]  # synthetic images per class = scale x real_per_class
    seeds: list[int] = [0, 1, 2]  # each seed redraws the subsets and the initialisation
    iters: int = Field(400, gt=0)  # optimiser steps per training (same for every setting)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    size: int = Field(32, ge=16)  # training/test input size (32 keeps 21 trainings at a few CPU minutes)
    width: int = Field(16, gt=0)  # tiny_cnn width
    synthetic_kept_only: bool = True  # train only on samples the calibration kept
    test_limit: int | None = Field(None, gt=0)
    threads: int | None = Field(None, gt=0)  # torch.set_num_threads
    output: str | None = None  # folder for downstream.json/png; default: the synthetic dataset folder

    @field_validator("scales")
    @classmethod
    def _scales(cls, v):
        if not v or min(v) <= 0:
            raise ValueError(f"scales must be a non-empty list of positive multiples, got {v}")
        return v


def load_config(path: str | Path, overrides=()) -> DownstreamConfig:
    from synfer.recipe import read_yaml, validate_recipe

    problems: list[str] = []
    data = read_yaml(path, overrides, problems)
    return validate_recipe(DownstreamConfig, data, source=str(path), problems=problems)


def per_class_subset(y, per_class: int, rng):
    """Indices of up to `per_class` samples of every class (fewer where a class has fewer)."""
    import numpy as np

    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        out.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def scores(y_true, y_pred, num_classes: int) -> dict[str, float]:
    """Accuracy (WAR) and unweighted average recall over the classes present in the test set."""
    from synfer.scoring import classification_scores

    return classification_scores(y_true, y_pred, num_classes)


def trainable(name: str):
    """The classifier plugin the benchmark trains, through the registry (the core imports no plugin)."""
    from synfer.plugins import PluginError, get_registry
    from synfer.stages import TrainableClassifier

    try:
        cls = get_registry().get("guidance_classifier", name)
    except PluginError as exc:
        raise click.ClickException(f"classifier: {exc}")
    if not issubclass(cls, TrainableClassifier):
        raise click.ClickException(f"classifier: {cls.kind} {name!r} ({cls.__module__}) cannot be trained from arrays; "
                                   "expected a synfer.stages.TrainableClassifier such as tiny-cnn")
    return cls


def train_and_test(cfg: DownstreamConfig, x, y, x_test, y_test, seed: int) -> dict[str, float]:
    import contextlib
    import io

    from synfer.contracts import calling

    cls = trainable(cfg.classifier)
    log = io.StringIO()
    try:  # 21 trainings' runner logs would bury the table: keep them unless a training fails
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), calling(cls, "fit_arrays"):
            predict = cls.fit_arrays(x, y, len(L.label_space(cfg.label_space)), iters=cfg.iters, batch_size=cfg.batch_size, lr=cfg.lr,
                                     seed=seed, size=cfg.size, width=cfg.width, threads=cfg.threads)
    except Exception:
        print(log.getvalue())
        raise
    pred = predict(x_test).argmax(1)
    return scores(y_test, pred, len(L.label_space(cfg.label_space)))


def run_downstream(cfg: DownstreamConfig, echo=print) -> dict:
    """All trainings; returns the downstream.json content (and writes it, with the plot)."""
    import numpy as np
    import torch

    from synfer.arrays import load_arrays

    trainable(cfg.classifier)  # before the images load: a wrong name fails at once
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    x_real, y_real, _, _ = load_arrays(cfg.real_train, cfg.label_space, cfg.size, kept_only=True, label_key="expression")
    x_syn, y_syn, _, _ = load_arrays(cfg.synthetic, cfg.label_space, cfg.size, kept_only=cfg.synthetic_kept_only)
    x_test, y_test, _, _ = load_arrays(cfg.real_test, cfg.label_space, cfg.size, kept_only=True, label_key="expression", limit=cfg.test_limit)
    for name, y in (("real_train", y_real), ("synthetic", y_syn), ("real_test", y_test)):
        if len(y) == 0:
            raise click.ClickException(f"{name} ({getattr(cfg, name)}) has no images with labels in {cfg.label_space}")
    echo(f"loaded {len(y_real)} real, {len(y_syn)} synthetic, {len(y_test)} test images at {cfg.size}x{cfg.size} ({time.time() - t0:.1f} s)")
    runs = []
    plan = [("real", 0.0)] + [(s, k) for s in SETTINGS[1:] for k in cfg.scales]
    for seed in cfg.seeds:
        rng = stream_rng(seed, "benchmark.real")
        real_idx = per_class_subset(y_real, cfg.real_per_class, rng)
        for setting, scale in plan:
            # one permutation per seed: the 2x synthetic subset contains the 1x one
            syn_idx = per_class_subset(y_syn, int(round(scale * cfg.real_per_class)), stream_rng(seed, "benchmark.synthetic")) if scale else []
            parts_x = ([x_real[real_idx]] if setting != "synthetic" else []) + ([x_syn[syn_idx]] if scale else [])
            parts_y = ([y_real[real_idx]] if setting != "synthetic" else []) + ([y_syn[syn_idx]] if scale else [])
            x, y = np.concatenate(parts_x), np.concatenate(parts_y)
            t = time.time()
            res = train_and_test(cfg, x, y, x_test, y_test, seed)
            run = {"setting": setting, "scale": scale, "seed": seed, "train_images": int(len(y)),
                   "synthetic_images": int(len(syn_idx)), **res, "seconds": round(time.time() - t, 2)}
            runs.append(run)
            echo(f"  seed {seed} {setting:<15} x{scale:<4g} {len(y):>5} imgs  acc {res['accuracy']:.3f}  uar {res['uar']:.3f}  ({run['seconds']:.1f} s)")
    result = {"config": cfg.model_dump(), "runs": runs, "summary": summarize(runs), "seconds": round(time.time() - t0, 1),
              "counts": {"real_train": int(len(y_real)), "synthetic": int(len(y_syn)), "real_test": int(len(y_test))}}
    out = Path(cfg.output or cfg.synthetic)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "downstream.json", result)
    plot_downstream(result, out / "downstream.png")
    return result


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds per (setting, scale)."""
    import numpy as np

    keys = sorted({(r["setting"], r["scale"]) for r in runs}, key=lambda k: (SETTINGS.index(k[0]), k[1]))
    out = []
    for setting, scale in keys:
        rs = [r for r in runs if r["setting"] == setting and r["scale"] == scale]
        row = {"setting": setting, "scale": scale, "seeds": len(rs), "train_images": int(np.mean([r["train_images"] for r in rs]))}
        for m in ("accuracy", "uar"):
            v = np.array([r[m] for r in rs])
            row[f"{m}_mean"], row[f"{m}_std"] = float(v.mean()), float(v.std())
        out.append(row)
    return out


def table(result: dict) -> str:
    lines = [f"{'setting':<16}{'scale':>6}{'images':>8}{'accuracy':>17}{'UAR':>17}"]
    for r in result["summary"]:
        scale = "-" if r["setting"] == "real" else f"{r['scale']:g}x"
        lines.append(f"{r['setting']:<16}{scale:>6}{r['train_images']:>8}"
                     f"{r['accuracy_mean']:>10.3f} ± {r['accuracy_std']:.3f}{r['uar_mean']:>10.3f} ± {r['uar_std']:.3f}")
    lines.append(f"({len(result['runs'])} trainings, {result['seconds']:.0f} s in all; mean ± std over seeds)")
    return "\n".join(lines)


def plot_downstream(result: dict, path):
    """Fig. 6 style: accuracy and UAR vs synthetic scale; real-only as a horizontal band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for ax, m, title in zip(axes, ("accuracy", "uar"), ("accuracy", "UAR")):
        for r in (r for r in summary if r["setting"] == "real"):
            lo, hi = r[f"{m}_mean"] - r[f"{m}_std"], r[f"{m}_mean"] + r[f"{m}_std"]
            ax.axhspan(lo, hi, color="0.6", alpha=0.3, lw=0)
            ax.axhline(r[f"{m}_mean"], color="0.3", ls="--", label=f"real only ({r['train_images']} imgs)")
        for setting, style in (("synthetic", "o-"), ("real+synthetic", "s-")):
            rs = [r for r in summary if r["setting"] == setting]
            if rs:
                ax.errorbar([r["scale"] for r in rs], [r[f"{m}_mean"] for r in rs], yerr=[r[f"{m}_std"] for r in rs],
                            fmt=style, capsize=3, label=f"{setting} only" if setting == "synthetic" else setting)
        ax.set_xlabel("synthetic images (x real set size)")
        ax.set_ylabel(f"test {title} (real)")
        ax.set_xticks(sorted({r["scale"] for r in summary if r["setting"] != "real"}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    cfg = result.get("config", {})
    fig.suptitle(f"Downstream FER on held-out real faces ({cfg.get('real_per_class', '?')} real/class, {len(cfg.get('seeds', []))} seeds)", fontsize=10)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


@click.group("benchmark")
def benchmark_cli():
    """Benchmarks of a synthetic dataset's usefulness (paper 5.2)."""


@benchmark_cli.command("downstream")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
def downstream(recipe, overrides):
    """Train the same small FER model on real / synthetic / real+synthetic data; test on real.

    OVERRIDES are key=value pairs, e.g. seeds=[0] iters=50 synthetic=out/quickstart
    """
    from synfer.recipe import RecipeError

    try:
        cfg = load_config(recipe, overrides)
    except RecipeError as exc:
        raise click.ClickException(str(exc))
    n = len(cfg.seeds) * (1 + 2 * len(cfg.scales))
    click.echo(f"downstream: {n} trainings of {cfg.iters} steps at {cfg.size}x{cfg.size}")
    result = run_downstream(cfg, echo=click.echo)
    click.echo(table(result))
    out = Path(cfg.output or cfg.synthetic)
    click.echo(f"-> {out / 'downstream.json'}, {out / 'downstream.png'}")
