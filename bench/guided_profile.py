"""Where a guided step's time goes on the narrow SD 1.5 topology (issue 16's CPU fallback).

    OMP_NUM_THREADS=1 python bench/guided_profile.py [--size 128 --batch 4 --repeats 10]

Random weights (synfer_plugins.sd.testing, width `narrow`), an ApproxDecoder and the shipped tiny-cnn, as
bench/bench_gpu.py's "+ guidance approx" row. Prints the median ms of one classifier-free pair (the bare
pipeline's step), of one guided update (UNet forward + approx decode + classifier + backward to the text
embedding), the same with the math attention backend instead of flash, and the top operators of the guided
update by self CPU time (torch.profiler)."""
from __future__ import annotations

import argparse

from bench_gpu import CLASSES
from dtype_probe import median_ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import profile

    from synfer_plugins.sd.approx_decoder import ApproxDecoder
    from synfer_plugins.sd.model import SDModel
    from synfer_plugins.sd.testing import sd15_components
    from synfer_plugins.tiny_cnn import TinyCNN

    b = args.batch
    parts = sd15_components([f"a photo of a {e} person" for e in CLASSES] + [""], "narrow", sample_size=args.size)
    sd = SDModel(parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"], parts["vae"])
    for m in (sd.unet, sd.text_encoder, sd.vae):
        m.requires_grad_(False).eval()
    approx = ApproxDecoder(4, args.size // 8, 64).eval().requires_grad_(False)
    clf = TinyCNN(TinyCNN.Config(device="cpu"))
    x, t = torch.randn(b, 4, args.size // 8, args.size // 8), torch.tensor(500)
    c = sd.encode_text([f"a photo of a {CLASSES[i % 8]} person" for i in range(b)])
    pair_c = torch.cat([c, sd.encode_text([""] * b)])

    def pair():
        with torch.no_grad():
            sd.predict_noise(torch.cat([x, x]), t, pair_c)

    def guided():
        e = c.clone().requires_grad_(True)
        with torch.enable_grad():
            image = approx(x - sd.predict_noise(x, t, e)).clamp(-1, 1)
            loss = F.cross_entropy(clf.forward(image.float()), torch.zeros(b, dtype=torch.long))
            torch.autograd.grad(loss, e)

    def guided_math():
        with sdpa_kernel(SDPBackend.MATH):
            guided()

    for fn in (pair, guided, guided_math):
        fn()
    print(f"narrow SD 1.5 topology, {args.size} px, batch {b}, {torch.get_num_threads()} thread(s); medians of {args.repeats}")
    print(f"classifier-free pair: {median_ms(pair, args.repeats)} ms; guided update: {median_ms(guided, args.repeats)} ms; "
          f"guided update, math attention: {median_ms(guided_math, args.repeats)} ms")
    with profile() as prof:
        for _ in range(5):
            guided()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
