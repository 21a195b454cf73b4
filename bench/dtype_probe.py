"""The shipped tiny UNet in float32 against bfloat16 (`generator.dtype`): one CFG forward at batch 32
(inference_mode) and one guided step's forward + backward to the text embedding at batch 16.

    python bench/dtype_probe.py [--threads 2]

On CPUs with AMX (Sapphire Rapids and later) oneDNN runs bf16 convolutions and matmuls on the tile
unit; without it bf16 is emulated and slower. Prints the median ms of each."""
from __future__ import annotations

import argparse
import os
import time


def median_ms(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return round(sorted(ts)[len(ts) // 2] * 1000, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    import torch

    from synfer_plugins.sd.generator import SDGenerator

    torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    print(f"threads {args.threads}; AMX bf16: {'amx_bf16' in flags}")
    for dtype in ("float32", "bfloat16"):
        m = SDGenerator(SDGenerator.Config(dtype=dtype)).load()
        x = torch.randn(32, m.unet.config.in_channels, m.native_size, m.native_size, dtype=m.dtype)
        emb = m.encode_text(["a photo of a happy person"] * 32)
        aus = m.au_tensor([{}] * 32)
        t = torch.tensor(500)
        with torch.inference_mode():
            for _ in range(2):
                m.predict_noise(x, t, emb, aus)
            fwd = median_ms(lambda: m.predict_noise(x, t, emb, aus), args.repeats)
        e = emb[:16].detach().clone().requires_grad_(True)

        def guided():
            m.predict_noise(x[:16], t, e, aus[:16]).float().square().mean().backward()
        guided()
        bwd = median_ms(guided, args.repeats)
        print(f"{dtype:9s} CFG forward, batch 32: {fwd} ms; forward + backward to the text embedding, batch 16: {bwd} ms")


if __name__ == "__main__":
    main()
