"""How often each voter of a calibrated dataset agrees with the oracle (the procedural world's judge).

    python bench/voter_agreement.py out/tables4/cal-layout [--label-space affectnet8] [--judge oracle-cnn]

Prints, over every sample (kept or not), the share whose preassigned label, final label and each
voter's own argmax (`predictions` in metadata.jsonl, already in the recipe's label space) match
the judge's class. Judge, rows and images as the `label-quality` evaluator reads them.
"""
from __future__ import annotations

import argparse

import numpy as np

from synfer import labels as L
from synfer_plugins.evaluators import build_plugin, dataset_rows, judge_labels, load_images


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--label-space", default="affectnet8", help="The recipe's label space (the one the dataset was calibrated in).")
    ap.add_argument("--judge", default="oracle-cnn", help="A guidance-classifier or expert plugin name.")
    args = ap.parse_args()
    rows = dataset_rows(args.dataset, kept_only=False)
    verdict = judge_labels(build_plugin(args.judge, ("guidance_classifier", "expert"), "cpu"), load_images(args.dataset, rows))
    space = L.label_space(args.label_space)
    share = lambda names: float(np.mean([a == v for a, v in zip(names, verdict)]))  # noqa: E731
    print(f"{args.dataset}: {len(rows)} samples, judge {args.judge}")
    print(f"  preassigned  {share([r['preassigned_label'] for r in rows]):.3f}")
    print(f"  final        {share([r['label'] for r in rows]):.3f}")
    for name in rows[0].get("predictions", {}):
        print(f"  {name:<12} {share([space[int(np.argmax(r['predictions'][name]))] for r in rows]):.3f}")


if __name__ == "__main__":
    main()
