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
    args = ap.parse_args()
    import torch

    from synfer_plugins.sd.generator import SDGenerator

    torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    native = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx_tile": torch.cpu._is_amx_tile_supported()}
    print(f"threads {args.threads}; AMX bf16 in /proc/cpuinfo: {'amx_bf16' in flags}; torch.cpu says {native}")
    for dtype, fwd in (("float32", None), ("bfloat16", None), ("float32", "bfloat16")):
        m = SDGenerator(SDGenerator.Config(dtype=dtype, forward_dtype=fwd)).load()
        x = torch.randn(32, m.unet.config.in_channels, m.native_size, m.native_size, dtype=m.dtype)
        emb = m.encode_text(["a photo of a happy person"] * 32)
        aus = m.au_tensor([{}] * 32)
        t = torch.tensor(500)
        with torch.inference_mode():
            for _ in range(2):
                m.predict_noise(x, t, emb, aus, no_grad_pass=True)
            ms = median_ms(lambda: m.predict_noise(x, t, emb, aus, no_grad_pass=True), args.repeats)
        e = emb[:16].detach().clone().requires_grad_(True)

        def guided():
            m.predict_noise(x[:16], t, e, aus[:16]).float().square().mean().backward()
        guided()
        bwd = median_ms(guided, args.repeats)
        name = dtype + (f" + forward_dtype {fwd}" if fwd else "")
        print(f"{name:34s} CFG forward, batch 32: {ms} ms; forward + backward to the text embedding, batch 16: {bwd} ms")


if __name__ == "__main__":
    main()
