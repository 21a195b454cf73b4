"""Does the generator render the asked expression from text alone? (issue 4's open criterion)

    python bench/probe_text_conditioning.py plugins/models/tiny-sd --test out/fetext-test

Samples 16 held-out FEText captions per class with the AU adapter off (au_scale 0), once
with the full caption and once with "The person looks <expression>.", and prints the
oracle-cnn accuracy of each (images judged at 64 px, like the `fer-accuracy` evaluator).
For reference it also judges the real faces behind those captions after a round trip
through 32 px (area down, bilinear up): how much the generator's resolution alone costs.
"""
from __future__ import annotations

import argparse

import numpy as np


def main():
    import torch

    from synfer.engine.dataset import read_metadata
    from synfer.stages import SampleRequest
    from synfer_plugins.sd.generator import SDGenerator
    from synfer_plugins.tiny_cnn import MODELS, load_arrays, load_net, predict_logits

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--test", default="out/fetext-test")
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--grid", default=None, help="Save the full-caption samples as a PNG grid (rows = expression).")
    args = ap.parse_args()
    by: dict[str, list] = {}
    for r in read_metadata(args.test):
        by.setdefault(r["expression"], []).append(r)
    rows = [r for e in by for r in by[e][:args.per_class]]
    oracle = load_net(MODELS / "oracle-cnn")[0]
    gen = SDGenerator(SDGenerator.Config(model=args.model, guidance_scale=args.cfg, au_scale=0.0, chunk=64, batch_size=64))
    labels = np.array([r["label"] for r in rows])
    x, y, _, all_rows = load_arrays(args.test, "affectnet8")
    pos = {r["index"]: i for i, r in enumerate(all_rows)}
    real = torch.from_numpy(x[[pos[r["index"]] for r in rows]]).permute(0, 3, 1, 2).float()
    real = torch.nn.functional.interpolate(torch.nn.functional.interpolate(real, size=32, mode="area"), size=64, mode="bilinear")
    real_u8 = real.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()
    print(f"real held-out faces through 32 px: oracle accuracy {float((predict_logits(oracle, real_u8).argmax(1) == labels).mean()):.3f}")
    for name, prompts in (("full caption", [r["caption"] for r in rows]),
                          ("'The person looks X.'", [f"The person looks {r['expression']}." for r in rows])):
        images = []
        for i in range(0, len(rows), 64):
            reqs = [SampleRequest(index=i + j, seed=1000 + i + j, expression=r["expression"], prompt=p, aus=r["aus"])
                    for j, (r, p) in enumerate(zip(rows[i:i + 64], prompts[i:i + 64]))]
            images.append(gen.sample(reqs))
        x = torch.nn.functional.interpolate(torch.cat(images), size=64, mode="bilinear")
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        acc = float((predict_logits(oracle, u8).argmax(1) == labels).mean())
        print(f"{name}: oracle accuracy {acc:.3f} on {len(rows)} samples (CFG {args.cfg}, text only)")
        if args.grid and name == "full caption":
            from PIL import Image

            k = min(8, args.per_class)
            tiles = u8.reshape(len(by), args.per_class, 64, 64, 3)[:, :k]
            Image.fromarray(tiles.transpose(0, 2, 1, 3, 4).reshape(len(by) * 64, k * 64, 3)).save(args.grid)
            print(f"grid: {args.grid} (rows: {', '.join(by)})")


if __name__ == "__main__":
    main()
