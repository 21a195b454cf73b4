"""The scores of synfer, in one place: pure functions on arrays and lists, no torch, no I/O.

- `classification_scores`: accuracy (WAR) and unweighted average recall (UAR) of class indices;
  used by the downstream benchmark and by the classifiers' held-out evaluations.
- `fer_accuracy_scores`: agreement of a judge with class names, overall and per class.
- `au_f1_scores`: per-AU F1 and AU accuracy of binarised intensities (paper Tab. 1 'FAU Acc.').
- `frechet_distance`, `mean_pairwise_distance`, `label_quality_scores`: FID, diversity and
  label quality of the evaluators (plugins/evaluators.py).
"""
from __future__ import annotations

import numpy as np

from synfer.contract import labels as L


def classification_scores(y_true, y_pred, num_classes: int | None = None) -> dict[str, float]:
    """Accuracy (WAR) and unweighted average recall over the classes present in `y_true`
    (`num_classes` only bounds which indices count; classes absent from `y_true` have no recall)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recalls = list(per_class_recall(y_true, y_pred, num_classes).values())
    return {"accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
            "uar": float(np.mean(recalls)) if recalls else 0.0}


def per_class_recall(y_true, y_pred, num_classes: int | None = None) -> dict[int, float]:
    """Recall of each class index present in `y_true` (`num_classes` bounds which indices count)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = np.unique(y_true) if num_classes is None else [c for c in range(num_classes) if (y_true == c).any()]
    return {int(c): float((y_pred[y_true == c] == c).mean()) for c in present}


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Eq. of FID: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), sqrtm from scipy."""
    from scipy import linalg  # heavy

    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # singular product (few images): offset the diagonals, as pytorch-fid does
        off = np.eye(s_a.shape[0]) * eps
        covmean = linalg.sqrtm((s_a + off) @ (s_b + off))
    covmean = covmean.real
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean), 0.0))


def fer_accuracy_scores(labels: list[str], predicted: list[str | None]) -> dict[str, float]:
    """Share of images whose judged class equals their label; per class too.
    `None` predictions (label outside the judge's classes) are left out and counted."""
    scored = [(t, p) for t, p in zip(labels, predicted) if p is not None]
    out: dict[str, float] = {"fer_accuracy": sum(t == p for t, p in scored) / len(scored) if scored else 0.0,
                             "fer_accuracy_n": float(len(scored))}
    if len(scored) < len(labels):
        out["fer_accuracy_unscored"] = float(len(labels) - len(scored))
    for c in sorted({t for t, _ in scored}):
        hits = [t == p for t, p in scored if t == c]
        out[f"fer_accuracy_{c}"] = sum(hits) / len(hits)
    return out


def au_f1_scores(target, predicted, threshold: float = L.AU_ON_THRESHOLD, undefined: float | None = None) -> dict[str, float]:
    """Per-AU F1 of (N, len(AU_KEYS)) intensities in [0, 1], both binarised at `threshold` (AU on
    when intensity >= threshold). An AU that is never on in either is undefined: left out of
    the mean `au_f1` (`undefined=None`), or scored as `undefined` (e.g. 0.0, the classifiers'
    held-out convention). `au_accuracy` is the share of all (image, AU) occurrences judged right."""
    t = np.asarray(target, np.float64) >= threshold
    p = np.asarray(predicted, np.float64) >= threshold
    out: dict[str, float] = {}
    f1s = []
    for j, key in enumerate(L.AU_KEYS):
        tp = int((t[:, j] & p[:, j]).sum())
        fp = int((~t[:, j] & p[:, j]).sum())
        fn = int((t[:, j] & ~p[:, j]).sum())
        if tp + fp + fn == 0:
            if undefined is not None:
                out[f"au_f1_{key}"] = float(undefined)
                f1s.append(out[f"au_f1_{key}"])
            continue
        out[f"au_f1_{key}"] = 2 * tp / (2 * tp + fp + fn)
        f1s.append(out[f"au_f1_{key}"])
    return {"au_f1": float(np.mean(f1s)) if f1s else 0.0, "au_accuracy": float((t == p).mean()) if t.size else 0.0, **out}


def mean_pairwise_distance(feats, metric: str = "cosine") -> float:
    """Mean distance over all pairs of rows (0 for identical rows)."""
    from scipy.spatial.distance import pdist  # heavy

    feats = np.asarray(feats, np.float64)
    if len(feats) < 2:
        return 0.0
    if metric == "cosine":  # 1 - cos = |a - b|^2 / 2 on unit vectors (zero vectors stay zero, not NaN)
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        unit = np.where(norms > 0, feats / np.maximum(norms, 1e-12), 0.0)
        return float((pdist(unit, "sqeuclidean") / 2).mean())
    return float(pdist(feats, metric).mean())


def label_quality_scores(rows: list[dict], verdicts: list[str | None]) -> dict[str, float]:
    """The judge's verdict as ground truth: how often the preassigned label and the final
    (calibrated) label agree with it, over kept samples and over all samples; plus how often a
    relabelling moved a sample to the judge's class (`..._relabelled_fixed`)."""
    def acc(pairs):
        pairs = [(a, v) for a, v in pairs if v is not None]
        return sum(a == v for a, v in pairs) / len(pairs) if pairs else 0.0

    kept = [(r, v) for r, v in zip(rows, verdicts) if r.get("kept", True)]
    relab = [(r, v) for r, v in kept if r["label"] != r["preassigned_label"]]
    out = {
        "label_quality_preassigned": acc([(r["preassigned_label"], v) for r, v in kept]),
        "label_quality_final": acc([(r["label"], v) for r, v in kept]),
        "label_quality_preassigned_all": acc([(r["preassigned_label"], v) for r, v in zip(rows, verdicts)]),
        "label_quality_final_all": acc([(r["label"], v) for r, v in zip(rows, verdicts)]),
        "label_quality_kept_share": len(kept) / len(rows) if rows else 0.0,
        "label_quality_relabelled": float(len(relab)),
    }
    if relab:
        out["label_quality_relabelled_fixed"] = acc([(r["label"], v) for r, v in relab])
    out["label_quality"] = out["label_quality_final"]
    out["label_quality_gain"] = out["label_quality_final"] - out["label_quality_preassigned"]
    return out
