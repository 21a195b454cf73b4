"""`synfer report DATASET`: one self-contained `report.html` in the dataset folder.

Sections: samples per expression (kept images per final label), the calibration summary
(calibration.json, or recomputed from metadata), a confusion matrix of preassigned vs final
labels, the metrics (metrics.json) and the downstream benchmark (downstream.png/json) when
present. Images are embedded as base64 PNG, so the file can be mailed or archived alone.
`write_report()` is what `synfer run` calls at the end of a run. The rows are read once, streamed
(`Tally`): counts and a few images per group, so a million-row dataset reports in bounded memory.
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from pathlib import Path

import click
import numpy as np

from synfer.commands.downstream import plot_downstream
from synfer.contract import labels as L
from synfer.engine.dataset import DatasetError, atomic_write, iter_metadata
from synfer.engine.dataset import row_label as _label
from synfer.engine.evaluate import PROVENANCE, metric_values

REPORT = "report.html"

# What each headline metric means (the built-in evaluator plugins); shown next to the numbers.
METRIC_NOTES = {
    "fid": "Fréchet distance to the reference set (default features: oracle-cnn penultimate layer, offline; "
           "not comparable with published Inception FID). Lower is closer.",
    "fer_accuracy": "share of kept images whose independent judge (oracle-cnn by default) agrees with the final label",
    "au_f1": f"mean per-AU F1 of the AU judge vs the requested AUs, binarised at intensity >= {L.AU_ON_THRESHOLD}",
    "au_accuracy": "share of (image, AU) occurrences the AU judge got right",
    "diversity": "mean pairwise feature distance within each final class, averaged over classes",
    "label_quality": "judge agreement with the final (calibrated) labels of kept samples",
    "label_quality_preassigned": "judge agreement with the preassigned labels of kept samples",
    "label_quality_gain": "label_quality_final - label_quality_preassigned",
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} .muted{color:#777;font-size:12px}
.row{display:flex;align-items:center;gap:4px;margin:3px 0} .row .name{width:90px;font-weight:600;font-size:13px}
.row img{width:80px;height:80px;image-rendering:pixelated;border:1px solid #ccc}
img.plot{max-width:100%;border:1px solid #eee}
"""


def _png_b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _image_b64(path: Path) -> str:
    from PIL import Image  # heavy

    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
    return _png_b64(buf.getvalue())


def _fig_b64(fig) -> str:
    import matplotlib.pyplot as plt  # heavy

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return _png_b64(buf.getvalue())


def _ordered(names) -> list[str]:
    names = set(names)
    return [c for c in L.EXPRESSIONS if c in names] + sorted(n for n in names if n not in L.EXPRESSIONS)


def _table(header: list[str], rows: list[list], left=(0,)) -> str:
    """An HTML table; columns in `left` are text (left-aligned), the others numbers."""
    cls = lambda i: "l" if i in left else ""  # noqa: E731
    th = "".join(f"<th class='{cls(i)}'>{html.escape(str(h))}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td class='{cls(i)}'>{html.escape(str(v))}</td>" for i, v in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


# ---------------------------------------------------------------- sections


class Tally:
    """What the report shows of the rows, gathered in one pass over them (in index order): counts, the confusion
    of preassigned and final labels, and the first `per_class` rows of each group shown. Holds no more rows than
    the page shows."""

    def __init__(self, per_class: int):
        self.per_class = per_class
        self.rows = self.kept = 0
        self.grid: dict[str, list[dict]] = {}  # final label -> first kept rows
        self.grid_n: Counter = Counter()
        self.changed = {"relabelled": {}, "dropped": {}}  # what -> preassigned label -> first rows
        self.changed_n = {"relabelled": Counter(), "dropped": Counter()}
        self.generated = 0  # rows with a preassigned label
        self.all_preassigned = True  # every row has the key: calibration can be recounted from the rows
        self.recount: dict[str, Counter] = {}  # synfer.engine.pipeline.calibration_counts, row by row
        self.labels: Counter = Counter()  # final labels (a labelled set's counts)
        self.confusion: Counter = Counter()  # (preassigned, final label, kept)

    def _keep(self, groups: dict, counts: Counter, key: str, r: dict) -> None:
        counts[key] += 1
        got = groups.setdefault(key, [])
        if len(got) < self.per_class:
            got.append(r)

    def add(self, r: dict) -> None:
        kept = r.get("kept", True)
        label = _label(r)
        self.rows += 1
        self.kept += bool(kept)
        if label:
            self.labels[label] += 1
            if kept:
                self._keep(self.grid, self.grid_n, label, r)
        if "preassigned_label" not in r:
            self.all_preassigned = False
        elif self.all_preassigned:
            c = self.recount.setdefault(r["preassigned_label"], Counter())
            c["total"] += 1
            if not kept:
                c["dropped"] += 1
            else:
                c["kept"] += 1
                c["relabelled"] += r["label"] != r["preassigned_label"]
        pre = r.get("preassigned_label")
        if pre:
            self.generated += 1
            if not kept:
                self._keep(self.changed["dropped"], self.changed_n["dropped"], pre, r)
            elif label != pre:
                self._keep(self.changed["relabelled"], self.changed_n["relabelled"], pre, r)
            if label:
                self.confusion[(L.canonical(pre), label, bool(kept))] += 1


def grid_section(root: Path, tally: Tally) -> str:
    lines = []
    for c in _ordered(tally.grid):
        imgs = "".join(f"<img src='{_image_b64(root / r['file_name'])}' title='{html.escape(r['file_name'])}'>" for r in tally.grid[c])
        lines.append(f"<div class='row'><span class='name'>{html.escape(c)}</span>{imgs}"
                     f"<span class='muted'>{tally.grid_n[c]} kept</span></div>")
    body = "".join(lines) or "<p class='muted'>no kept images</p>"
    return f"<section id='grid'><h2>Samples per expression (final label, kept)</h2>{body}</section>"


def changed_section(root: Path, tally: Tally) -> str:
    """What calibration did not keep as planned: relabelled samples (preassigned -> final) and dropped ones, shown beside
    the kept grid so a reader can judge the vote, per preassigned class."""
    if not tally.generated:
        return ""
    out = []
    for what, by in tally.changed.items():
        counts = tally.changed_n[what]
        lines = []
        for c in _ordered(by):
            imgs = "".join(f"<img src='{_image_b64(root / r['file_name'])}' title='{html.escape(_caption(r))}'>" for r in by[c])
            lines.append(f"<div class='row'><span class='name'>{html.escape(c)}</span>{imgs}"
                         f"<span class='muted'>{counts[c]} {what}</span></div>")
        body = "".join(lines) or f"<p class='muted'>none {what}</p>"
        out.append(f"<h3>{what.capitalize()} ({sum(counts.values())})</h3>{body}")
    return ("<section id='changed'><h2>Relabelled and dropped samples (by preassigned label)</h2>"
            "<p class='muted'>hover an image: its final label and the vote's confidence</p>" + "".join(out) + "</section>")


def _caption(r: dict) -> str:
    soft = r.get("soft_label") or []
    conf = f", confidence {max(soft):.2f}" if soft else ""
    final = _label(r) if r.get("kept", True) else "dropped"
    return f"{r['file_name']}: {r['preassigned_label']} -> {final}{conf}"


def calibration_for_report(root: Path, tally: Tally) -> tuple[dict[str, dict], str]:
    path = root / "calibration.json"
    if path.exists():
        return json.loads(path.read_text()), "calibration.json"
    if tally.rows and tally.all_preassigned:
        return {k: dict(v) for k, v in sorted(tally.recount.items())}, "recomputed from metadata.jsonl"
    return {c: {"total": n, "kept": n} for c, n in tally.labels.items()}, "no calibration: a labelled (real/FEText) set"


def calibration_section(root: Path, tally: Tally) -> str:
    counts, source = calibration_for_report(root, tally)
    cols = ["total", "kept", "relabelled", "dropped"]
    body, tot = [], Counter()
    for c in _ordered(counts):
        k = counts[c]
        tot.update({x: int(k.get(x, 0)) for x in cols})
        body.append([c] + [int(k.get(x, 0)) for x in cols])
    body.append(["all"] + [tot[x] for x in cols])
    return (f"<section id='calibration'><h2>Calibration summary</h2><p class='muted'>per preassigned class; source: {html.escape(source)}</p>"
            f"{_table(['class'] + cols, body)}</section>")


def confusion_section(tally: Tally) -> str:
    """Preassigned (rows) vs final label (columns); dropped samples get their own column."""
    if not tally.confusion:
        return "<section id='confusion'><h2>Preassigned vs final labels</h2><p class='muted'>not a generated set: no preassigned labels</p></section>"
    import matplotlib  # heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy

    classes = _ordered({pre for pre, _, _ in tally.confusion} | {final for _, final, _ in tally.confusion})
    cols = classes + ["dropped"]
    m = np.zeros((len(classes), len(cols)), int)
    for (pre, final, kept), n in tally.confusion.items():
        m[classes.index(pre), cols.index(final) if kept else len(classes)] += n
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(cols), 0.8 + 0.5 * len(classes)), constrained_layout=True)
    ax.imshow(m / np.maximum(m.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8, color="white" if m[i, j] > 0.6 * m[i].sum() else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("final label (kept) / dropped")
    ax.set_ylabel("preassigned label")
    agree = sum(m[i, i] for i in range(len(classes)))
    kept = int(m[:, :-1].sum())
    note = f"{agree} of {kept} kept samples keep their preassigned label; {int(m[:, -1].sum())} dropped"
    return (f"<section id='confusion'><h2>Preassigned vs final labels</h2><p class='muted'>{note}</p>"
            f"<img class='plot' src='{_fig_b64(fig)}'></section>")


def metrics_section(root: Path) -> str:
    path = root / "metrics.json"
    if not path.exists():
        return ("<section id='metrics'><h2>Metrics</h2><p class='muted'>no metrics.json yet: run "
                f"<code>synfer eval {html.escape(str(root.name if root.is_absolute() else root))} --reference REAL_SET</code></p></section>")

    raw = json.loads(path.read_text())
    metrics = metric_values(raw)
    by = {k: _measured_by(p) for p in (raw.get(PROVENANCE) or {}).values() for k in p.get("metrics", [])}
    heads = [k for k in metrics if k in METRIC_NOTES]
    rest = sorted(k for k in metrics if k not in METRIC_NOTES)
    fmt = lambda v: "null" if v is None else f"{v:.4f}" if isinstance(v, float) else v  # noqa: E731
    main = _table(["metric", "value", "meaning", "measured by"], [[k, fmt(metrics[k]), METRIC_NOTES[k], by.get(k, "?")] for k in heads],
                  left=(0, 2, 3)) if heads else ""
    more = _table(["metric", "value", "measured by"], [[k, fmt(metrics[k]), by.get(k, "?")] for k in rest], left=(0, 2)) if rest else ""
    return (f"<section id='metrics'><h2>Metrics</h2>{main}"
            f"<details><summary class='muted'>all {len(metrics)} numbers</summary>{more}</details></section>")


def _measured_by(prov: dict) -> str:
    """'fer-accuracy, judge tiny-cnn (models/judge), reference data/x': what made a metric, from metrics.json's provenance."""
    cfg = prov.get("config") or {}

    def name(v):
        return v.get("plugin", "?") + "".join(f" ({v[k]})" for k in ("weights", "path") if v.get(k)) if isinstance(v, dict) else str(v)

    parts = [prov.get("plugin", "?")]
    if "extractor" in cfg:  # FID, diversity: features from the judge (oracle), a local Inception file, or pixels
        parts.append(f"features {cfg['extractor']}" + (f" of {name(cfg['judge'])}" if cfg["extractor"] == "oracle" else "")
                     + (f" ({cfg['extractor_path']})" if cfg.get("extractor_path") else ""))
    elif cfg.get("judge"):
        parts.append(f"judge {name(cfg['judge'])}")
    ref = prov.get("reference") or cfg.get("reference")
    if ref:
        parts.append(f"reference {ref}")
    return ", ".join(parts)


def find_downstream(root: Path, downstream: str | Path | None) -> tuple[Path | None, Path | None]:
    """(downstream.json, downstream.png) from a file or folder option, else the dataset folder."""
    base = Path(downstream) if downstream else root
    if base.is_file():
        base = base.parent if base.suffix in (".json", ".png") else base
    js, png = base / "downstream.json", base / "downstream.png"
    if downstream and Path(downstream).is_file():
        p = Path(downstream)
        js, png = (p, p.with_suffix(".png")) if p.suffix == ".json" else (p.with_suffix(".json"), p)
    return (js if js.exists() else None), (png if png.exists() else None)


def downstream_section(root: Path, downstream) -> str:
    js, png = find_downstream(root, downstream)
    if js is None and png is None:
        return ("<section id='downstream'><h2>Downstream benchmark</h2><p class='muted'>not run: "
                "<code>synfer benchmark downstream recipes/downstream.yaml synthetic=DATASET</code></p></section>")
    result = json.loads(js.read_text()) if js else None
    if png:
        img = _image_b64(png)
    else:
        buf = io.BytesIO()
        plot_downstream(result, buf)
        img = _png_b64(buf.getvalue())
    tab = ""
    if result:
        rows = [[r["setting"], "-" if r["setting"] == "real" else f"{r['scale']:g}x", r["train_images"],
                 f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}", f"{r['uar_mean']:.3f} ± {r['uar_std']:.3f}"]
                for r in result["summary"]]
        tab = _table(["setting", "synthetic scale", "train images", "accuracy", "UAR"], rows)
    return f"<section id='downstream'><h2>Downstream benchmark</h2><img class='plot' src='{img}'>{tab}</section>"


# ---------------------------------------------------------------- the page


def write_report(dataset_dir: str | Path, downstream: str | Path | None = None, per_class: int = 6,
                 output: str | Path | None = None) -> Path:
    """Write `<dataset_dir>/report.html` (or `output`) and return its path."""
    root = Path(dataset_dir)
    tally = Tally(per_class)
    for r in iter_metadata(root):
        tally.add(r)
    title = f"synfer report: {root.name}"
    parts = [  # the folder's name, not its path: a published dataset carries no path of the machine it was made on
        f"<section id='summary'><h1>{html.escape(title)}</h1><p class='muted'>{html.escape(root.resolve().name)}: "
        f"{tally.rows} images, {tally.kept} kept</p></section>",
        grid_section(root, tally),
        changed_section(root, tally),
        calibration_section(root, tally),
        confusion_section(tally),
        metrics_section(root),
        downstream_section(root, downstream),
    ]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    return atomic_write(Path(output) if output else root / REPORT, page, sync=False)


@click.command("report")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--downstream", type=click.Path(exists=True), default=None,
              help="downstream.json/png (or their folder); default: the dataset folder.")
@click.option("--per-class", type=int, default=6, show_default=True, help="Images shown per expression.")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Where to write (default: DATASET/report.html).")
def report_cli(dataset, downstream, per_class, output):
    """Write a self-contained report.html for DATASET (samples, calibration, confusion, metrics, downstream)."""
    try:
        path = write_report(dataset, downstream, per_class, output)
    except DatasetError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"-> {path}")
