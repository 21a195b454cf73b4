"""The shipped tiny UNet in float32 against bfloat16 (`generator.dtype`), and float32 with the gradient-free
passes under bfloat16 autocast (`generator.forward_dtype`): one CFG forward at batch 32 (inference_mode, a
denoising pass) and one guided step's forward + backward to the text embedding at batch 16.

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
    ap.add_argument("--forward-batch", type=int, default=32, help="the forward pass's batch: 32 is a CFG pair of a 16-sample chunk, "
                    "16 the quickstart's chunk at CFG 1")
    args = ap.parse_args()
    import torch

    from synfer_plugins.sd.generator import SDGenerator

    torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    native = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx_tile": torch.cpu._is_amx_tile_supported()}
    print(f"threads {args.threads}; AMX bf16 in /proc/cpuinfo: {'amx_bf16' in flags}; torch.cpu says {native}")
    for dtype, fwd in (("float32", None), ("bfloat16", None), ("float32", "bfloat16")):
        m = SDGenerator(SDGenerator.Config(dtype=dtype, forward_dtype=fwd)).load()
        b = max(args.forward_batch, 16)
        x = torch.randn(b, m.unet.config.in_channels, m.native_size, m.native_size, dtype=m.dtype)
        emb = m.encode_text(["a photo of a happy person"] * b)
        aus = m.au_tensor([{}] * b)
        t, f = torch.tensor(500), args.forward_batch
        with torch.inference_mode():
            for _ in range(2):
                m.predict_noise(x[:f], t, emb[:f], aus[:f], no_grad_pass=True)
            ms = median_ms(lambda: m.predict_noise(x[:f], t, emb[:f], aus[:f], no_grad_pass=True), args.repeats)
        e = emb[:16].detach().clone().requires_grad_(True)

        def guided():
            m.predict_noise(x[:16], t, e, aus[:16]).float().square().mean().backward()
        guided()
        bwd = median_ms(guided, args.repeats)
        name = dtype + (f" + forward_dtype {fwd}" if fwd else "")
        print(f"{name:34s} forward, batch {args.forward_batch}: {ms} ms; forward + backward to the text embedding, batch 16: {bwd} ms")


if __name__ == "__main__":
    main()
