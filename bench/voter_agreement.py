"""How often each voter of a calibrated dataset agrees with the oracle (the procedural world's judge).

    python bench/voter_agreement.py out/tables4/cal-layout [--label-space affectnet8] [--judge plugins/models/oracle-cnn]

Prints, over every sample (kept or not), the share whose preassigned label, final label and each
voter's own argmax (`predictions` in metadata.jsonl, already in the recipe's label space) match
the judge's class.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from synfer import labels as L
from synfer_plugins.tiny_cnn import load_net, predict_logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--label-space", default="affectnet8", help="The recipe's label space (the one the dataset was calibrated in).")
    ap.add_argument("--judge", default="plugins/models/oracle-cnn")
    args = ap.parse_args()
    rows = [json.loads(line) for line in (args.dataset / "metadata.jsonl").read_text().splitlines() if line.strip()]
    net, cfg = load_net(args.judge)
    x = np.stack([np.asarray(Image.open(args.dataset / r["file_name"]).convert("RGB")) for r in rows])
    judge_space, space = list(L.label_space(cfg["label_space"])), list(L.label_space(args.label_space))
    verdict = [judge_space[i] for i in predict_logits(net, x).argmax(1)]
    share = lambda names: float(np.mean([a == v for a, v in zip(names, verdict)]))  # noqa: E731
    print(f"{args.dataset}: {len(rows)} samples, judge {args.judge}")
    print(f"  preassigned  {share([r['preassigned_label'] for r in rows]):.3f}")
    print(f"  final        {share([r['label'] for r in rows]):.3f}")
    for name in rows[0].get("predictions", {}):
        print(f"  {name:<12} {share([space[int(np.argmax(r['predictions'][name]))] for r in rows]):.3f}")


if __name__ == "__main__":
    main()
