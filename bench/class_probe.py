"""Which classes does a synthetic set fail to teach? Per-class recall both ways (issue 18).

    OMP_NUM_THREADS=1 python bench/class_probe.py out/synth-s12-layout6k [--per-class 250 --seed 0]   # ~2 min

Trains the downstream benchmark's classifier (recipes/downstream.yaml: tiny-cnn, 800 steps, 32x32) on
`--per-class` real faces and on as many synthetic ones, with the benchmark's own subsets for `--seed`,
then prints each model's per-class recall on the held-out real faces and on the whole synthetic set.
A class the real model recognises in the synthetic set but the synthetic model misses in the real
test covers only part of the real class.
"""
from __future__ import annotations

import argparse


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("synthetic")
    ap.add_argument("--recipe", default="recipes/downstream.yaml")
    ap.add_argument("--per-class", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from synfer import labels as L
    from synfer.commands.downstream import load_config, load_sets, per_class_subset, trainable
    from synfer.engine.scoring import per_class_recall
    from synfer.engine.seeds import stream_rng

    cfg = load_config(args.recipe, [f"synthetic={args.synthetic}", f"real_per_class={args.per_class}", "allow_short=true"])
    (xr, yr), (xs, ys, _), tests = load_sets(cfg)
    xt, yt = tests[""]
    names, cls = L.label_space(cfg.label_space), trainable(cfg.classifier)
    print(f"{'trained on':<22}" + " ".join(f"{n[:7]:>8}" for n in names) + "     all")
    for train, x, y, stream in (("real", xr, yr, "benchmark.real"), ("synthetic", xs, ys, "benchmark.synthetic")):
        idx = per_class_subset(y, args.per_class, stream_rng(args.seed, stream))
        predict = cls.fit_arrays(x[idx], y[idx], len(names), iters=cfg.iters, batch_size=cfg.batch_size, lr=cfg.lr,
                                 seed=args.seed, size=cfg.size, width=cfg.width, threads=cfg.threads)
        for test, xe, ye in (("real test", xt, yt), ("synthetic set", xs, ys)):
            pred = predict(xe).argmax(1)
            r = per_class_recall(ye, pred, len(names))
            print(f"{train + ' -> ' + test:<22}" + " ".join(f"{r.get(c, float('nan')):8.2f}" for c in range(len(names)))
                  + f"  {float((pred == ye).mean()):6.3f}")


if __name__ == "__main__":
    main()
