"""What decides a sample's bytes when the sd generator batches the UNet, and what a chunk size buys.

    OMP_NUM_THREADS=1 python bench/chunk_probe.py --only bytes     # ~1 min on 2 cores
    OMP_NUM_THREADS=1 python bench/chunk_probe.py --only speed [--n 32 --steps 10]   # ~5 min (more on a busy machine)

bytes: the shipped tiny model, 4 DDIM steps, CFG 4, `SDGenerator.sample` on hand-made batches:
  does sample 3 of a batch of 8 keep its bytes when the other 7 are other samples (content),
  when it moves to slot 5 (position), in batches of other shapes, and at 2 threads instead of 1?
speed: CPU seconds per image (`time.process_time`, 1 thread: robust to other jobs on a shared
  machine) and wall images/s of 32 samples, 10 steps, at UNet batch shapes (chunks) 1..32.
"""
from __future__ import annotations

import argparse
import time


def setup(steps: int):
    import torch

    from synfer.labels import sample_seed
    from synfer.stages import SampleRequest
    from synfer_plugins.sd.generator import SDGenerator

    gen = SDGenerator(SDGenerator.Config(steps=steps))

    def req(i, expr="happy"):
        return SampleRequest(index=i, seed=sample_seed(0, i), expression=expr, aus={}, prompt=f"a photo of a {expr} person")

    def run(reqs):
        with torch.inference_mode():
            return gen.sample(reqs)
    return torch, req, run


def probe_bytes() -> None:
    torch, req, run = setup(4)
    torch.set_num_threads(1)
    base = [req(i) for i in range(8)]
    other = [req(100 + i, "sad") for i in range(8)]
    x = run(base)

    def same(a, b):
        return f"{'same bytes' if torch.equal(a, b) else 'DIFFERENT'} (max |diff| {float((a - b).abs().max()):.1e})"
    print("1 thread, reference: sample 3 in a batch of 8")
    print("  other samples in the other 7 slots:  ", same(x[3], run(other[:3] + [base[3]] + other[4:])[3]))
    print("  moved to slot 5 (others around it):  ", same(x[3], run(other[:5] + [base[3]] + other[6:])[5]))
    for b in (1, 2, 3, 5, 16):  # the same samples at the same slots, in batches of other shapes
        k = min(b, 8)
        print(f"  batch of {b:<2} vs batch of 8 (first {k} slots):", same(x[:k], run((base + other)[:b])[:k]))
    torch.set_num_threads(2)
    print("2 threads:")
    print("  batch of 8 vs 1 thread:              ", same(x, run(base)))
    for b in (1, 3, 5, 16):
        k = min(b, 8)
        print(f"  batch of {b:<2} vs 1-thread batch of 8 (first {k} slots):", same(x[:k], run((base + other)[:b])[:k]))
    torch.set_num_threads(1)


def probe_speed(chunks=(1, 4, 8, 16, 32), n: int = 32, steps: int = 10) -> None:
    torch, req, run = setup(steps)
    torch.set_num_threads(1)
    reqs = [req(i, ["happy", "sad", "angry", "neutral"][i % 4]) for i in range(n)]
    run(reqs[:2])
    print(f"| chunk (UNet batch, x2 for CFG) | images per CPU second | images/s wall |   ({n} samples, {steps} steps, 1 thread)\n|---|---|---|")
    for c in chunks:
        t0, w0 = time.process_time(), time.perf_counter()
        for s in range(0, n, c):
            run(reqs[s:s + c])
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        print(f"| {c} | {n / cpu:.2f} | {n / wall:.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["bytes", "speed"], default=None)
    ap.add_argument("--n", type=int, default=32, help="speed: samples per chunk size")
    ap.add_argument("--steps", type=int, default=10, help="speed: DDIM steps")
    args = ap.parse_args()
    if args.only in (None, "bytes"):
        probe_bytes()
    if args.only in (None, "speed"):
        probe_speed(n=args.n, steps=args.steps)


if __name__ == "__main__":
    main()
