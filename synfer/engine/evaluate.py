"""Run evaluator plugins on a dataset and merge their numbers into metrics.json with each metric's provenance
(the engine of `synfer eval`, synfer.commands.eval, and of the end of `synfer run`).

metrics.json holds one number per metric (null where an evaluator gave NaN) and, under `provenance`,
for each evaluator: its plugin, its resolved config (judge, feature extractor, reference), the
metrics it wrote and the dataset's row counts when it ran. A metric is written by one evaluator:
another evaluator returning the same key is an error naming both.
"""
from __future__ import annotations

import json
import math
import numbers
import sys
from pathlib import Path
from typing import Any

from synfer.contract.contracts import Guarded
from synfer.engine.dataset import METADATA, iter_metadata, write_json
from synfer.engine.recipe import apply_overrides
from synfer.engine.registry import get_registry
from synfer.engine.resume import RECIPE_FILE

DEFAULT_EVALUATORS = ("fid", "fer-accuracy", "au-accuracy", "diversity", "label-quality")
METRICS = "metrics.json"
PROVENANCE = "provenance"  # the one key of metrics.json that is not a metric


class EvaluationError(RuntimeError):
    """Some evaluators failed; the others' results are written."""


def metric_values(metrics: dict) -> dict[str, float | None]:
    """The metrics of a metrics.json mapping, without its provenance."""
    return {k: v for k, v in metrics.items() if k != PROVENANCE}


def checked_metrics(name: str, result: Any) -> dict[str, float | None]:
    """An evaluator's result as a flat mapping of str -> finite float (numpy scalars converted); NaN/inf become
    None with a warning. Anything else is a ValueError naming the evaluator, what it gave and what was expected."""
    if not isinstance(result, dict):
        raise ValueError(f"evaluator {name!r} returned {type(result).__name__}; expected a dict of metric name -> number")
    out: dict[str, float | None] = {}
    for key, value in result.items():
        if not isinstance(key, str) or not key or key == PROVENANCE:
            raise ValueError(f"evaluator {name!r} returned the key {key!r}; expected a non-empty metric name other than {PROVENANCE!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"evaluator {name!r} returned {key}={value!r} ({type(value).__name__}); expected a number")
        value = float(value)
        if not math.isfinite(value):
            print(f"warning: evaluator {name!r} gave {key}={value}; written as null", file=sys.stderr)
            value = None
        out[key] = value
    return out


def _counts(dataset: Path) -> dict[str, int]:
    if not (dataset / METADATA).exists():
        return {}
    rows = kept = 0
    for r in iter_metadata(dataset, verify=False):  # streamed: a million-row dataset is counted, not held
        rows += 1
        kept += bool(r.get("kept", True))
    return {"rows": rows, "kept": kept}


def run_evaluators(dataset: str | Path, evaluators: list[tuple[dict, Any]], reference: str | Path | None = None,
                   write: bool = True) -> dict[str, float | None]:
    """Run each (block, built evaluator), keep what succeeds, merge it into DATASET/metrics.json with its provenance.
    One evaluator's failure keeps the others' results; the failures are raised together at the end, each named."""
    dataset = Path(dataset)
    metrics: dict[str, float | None] = {}
    provenance: dict[str, dict] = {}
    owner: dict[str, str] = {}
    failures: list[str] = []
    counts = _counts(dataset)
    for block, ev in evaluators:
        label = ev.name if ev.name not in provenance else f"{ev.name}#{sum(k.split('#')[0] == ev.name for k in provenance) + 1}"
        try:
            result = checked_metrics(ev.name, ev.evaluate(dataset, Path(reference) if reference else None))
        except Exception as exc:  # noqa: BLE001 - one evaluator's failure must not lose the others' results
            failures.append(f"{label}: {exc}")
            continue
        clash = sorted(k for k in result if k in owner)
        if clash:
            failures.append(f"{label}: returned {', '.join(clash)}, already written by {owner[clash[0]]}; "
                            "an evaluator's keys must be its own (prefix them with its name)")
            continue
        owner.update({k: label for k in result})
        metrics.update(result)
        provenance[label] = {"plugin": ev.name, "config": _config(block, ev), "reference": str(reference) if reference else None,
                             "metrics": sorted(result), "dataset": counts}
    if write and (metrics or provenance):
        merge_metrics(dataset, metrics, provenance)
    if failures:
        raise EvaluationError(f"{len(failures)} evaluator(s) failed (the others' results are in {dataset / METRICS}):\n"
                              + "\n".join(f"  - {f}" for f in failures))
    return metrics


def _config(block: dict, ev) -> dict:
    """The evaluator's settings as it ran: its Config with defaults (judge, extractor, reference ...)."""
    config = getattr(ev, "config", None)
    return config.model_dump(mode="json") if hasattr(config, "model_dump") else {k: v for k, v in block.items() if k != "plugin"}


def merge_metrics(dataset: str | Path, metrics: dict[str, float | None], provenance: dict[str, dict] | None = None) -> Path:
    """Write `metrics` into DATASET/metrics.json, keeping the metrics (and provenance) of evaluators not rerun. A key
    an earlier run's other evaluator wrote is refused (ValueError naming both)."""
    path = Path(dataset) / METRICS
    old = json.loads(path.read_text()) if path.exists() else {}
    old_prov = old.get(PROVENANCE, {}) if isinstance(old.get(PROVENANCE), dict) else {}
    provenance = provenance or {}
    writer = {k: name for name, p in old_prov.items() for k in p.get("metrics", [])}
    for name, p in provenance.items():
        taken = sorted(k for k in p["metrics"] if writer.get(k, name) != name and writer.get(k) not in provenance)
        if taken:
            raise ValueError(f"evaluator {name!r} returned {', '.join(taken)}, which {writer[taken[0]]} wrote in {path}; "
                             "an evaluator's keys must be its own")
    rerun = set(provenance)
    kept_prov = {n: p for n, p in old_prov.items() if n not in rerun}
    stale = {k for n, p in old_prov.items() if n in rerun for k in p.get("metrics", [])}
    values = {k: v for k, v in metric_values(old).items() if k not in stale}
    return write_json(path, {**values, **metrics, PROVENANCE: {**kept_prov, **provenance}}, sort_keys=True)


def run_evaluator_blocks(dataset: str | Path) -> list[dict] | None:
    """The evaluator blocks the run that wrote DATASET used (its recipe.json), or None."""
    path = Path(dataset) / RECIPE_FILE
    if not path.exists():
        return None
    try:
        blocks = json.loads(path.read_text()).get("evaluators")
    except (json.JSONDecodeError, AttributeError):
        return None
    return [dict(b) for b in blocks] if isinstance(blocks, list) and blocks else None


def evaluate_dataset(dataset: str | Path, reference: str | Path | None = None, evaluators=None, device: str | None = None,
                     options=(), registry=None, write: bool = True) -> dict[str, float | None]:
    """Build each evaluator, run it, merge the results. `evaluators`: plugin names; None: the run's own (recipe.json),
    else DEFAULT_EVALUATORS. `options` like `fid.max_images=500` set keys of the block of that plugin."""
    reg = registry or get_registry()
    if evaluators is None and (blocks := run_evaluator_blocks(dataset)) is not None:
        pass
    else:
        names = list(evaluators or [n for n in DEFAULT_EVALUATORS if n != "fid" or reference is not None])
        blocks = [{"plugin": n} for n in names]
    names = [b["plugin"] for b in blocks]
    settings = apply_overrides({n: {} for n in names}, list(options))
    unknown = set(settings) - set(names)
    if unknown:
        raise ValueError(f"options for {sorted(unknown)}, which are not among the evaluators run ({', '.join(names)})")
    built = []
    for block in blocks:  # build all first: a typo fails before anything slow runs
        block = {**block, **settings[block["plugin"]]}
        cls = reg.get("evaluator", block["plugin"])
        if device and "device" in cls.Config.model_fields and "device" not in settings[block["plugin"]]:
            block["device"] = device
        built.append((block, Guarded(reg.build("evaluator", block), "evaluate")))
    return run_evaluators(dataset, built, reference, write)
