"""Throughput of the procedural face world: faces/s at 64x64 (single process).

    .venv/bin/python bench/bench_procedural.py [--size 64] [--n 2000] [--batch 256]

Times render_faces alone and ProceduralSource.records() (render + plan + PIL records).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()

    from synfer import labels as L
    from synfer_plugins.procedural import ProceduralSource, render_faces, sample_expression_aus, split_identities

    idents = split_identities("train", 200)
    rng = np.random.default_rng(0)
    exprs = L.label_space("affectnet8")
    aus = np.stack([sample_expression_aus(exprs[i % 8], rng) for i in range(args.n)])
    ids = [idents[i % len(idents)] for i in range(args.n)]
    render_faces(aus[:8], ids[:8], args.size, 0)  # warm-up
    t = time.perf_counter()
    for s in range(0, args.n, args.batch):
        render_faces(aus[s:s + args.batch], ids[s:s + args.batch], args.size, list(range(s, min(s + args.batch, args.n))))
    dt = time.perf_counter() - t
    print(f"render_faces: {args.n / dt:.0f} faces/s at {args.size}x{args.size} (batch {args.batch}, {dt:.2f}s for {args.n})")

    src = ProceduralSource(ProceduralSource.Config(num_images=args.n, size=args.size, batch_size=args.batch))
    t = time.perf_counter()
    count = sum(1 for _ in src.records())
    dt = time.perf_counter() - t
    print(f"ProceduralSource.records(): {count / dt:.0f} records/s at {args.size}x{args.size}")


if __name__ == "__main__":
    main()
