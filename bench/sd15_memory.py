"""Guidance peak memory per image and FERAnno cache bytes per image on the full SD 1.5 topology (issue 15).

Random weights, SD 1.5's exact shapes (synfer_plugins.sd.testing, width "full": UNet 859.5M parameters,
VAE 83.7M, 12-layer 768-wide CLIP text encoder), with an AU adapter attached as in the sd15 recipe.
One process per measurement (RSS is per process):

    OMP_NUM_THREADS=1 python bench/sd15_memory.py --size 256 --batch 1
    OMP_NUM_THREADS=1 python bench/sd15_memory.py --size 256 --batch 2
    OMP_NUM_THREADS=1 python bench/sd15_memory.py --size 256 --batch 2 --micro-batch 1

Guidance: one Eq. 4-6 update (UNet forward + VAE decode + classifier, backward to the text embedding)
on a batch; its memory is the peak resident set size during the update (sampled every 2 ms from
/proc/self/statm) minus the resident size just before it, so weights are not counted. On a GPU use
`--device cuda`: torch.cuda.max_memory_allocated is used instead.
FERAnno: the capture of `--batch` faces aligned to what the encoder reads (default max_res) and
written as the float16 cache; bytes per image on disk, and what the old cache kept (features pooled to
8, attention maps at full resolution) for the same capture.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size while the block runs, sampled by a thread."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=None, help="semantic_guidance.micro_batch (default: the whole batch)")
    ap.add_argument("--width", default="full", choices=["full", "narrow"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-feranno", action="store_true")
    ap.add_argument("--no-guidance", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    from synfer import labels as L
    from synfer.stages import SampleRequest
    from synfer_plugins.feranno.capture import align_capture, default_max_res, extract
    from synfer_plugins.feranno.stage import FERAnnoConfig
    from synfer_plugins.feranno.train import extract_dataset
    from synfer_plugins.sd.au_adapter import AUAdapter
    from synfer_plugins.sd.generator import SDGenerator
    from synfer_plugins.sd.model import SDModel
    from synfer_plugins.sd.sampling import GuidanceConfig, SemanticGuidance
    from synfer_plugins.sd.testing import count_cross_attention, sd15_components

    t0 = time.time()
    dtype = getattr(torch, args.dtype)
    parts = sd15_components(["a photo of a happy person", "a photo of a person"], args.width, sample_size=args.size)
    sd = SDModel(parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"], parts["vae"])
    unet_params = sum(p.numel() for p in sd.unet.parameters())
    sd.set_au_adapter(AUAdapter.for_unet(sd.unet))
    sd.to(args.device, dtype)
    for m in (sd.unet, sd.text_encoder, sd.vae, sd.au_adapter):
        m.requires_grad_(False).eval()  # what SDGenerator.load does
    gen = SDGenerator(SDGenerator.Config(steps=50, device=args.device, dtype=args.dtype, size=args.size))
    gen.model = sd
    out = {"size": args.size, "batch": args.batch, "micro_batch": args.micro_batch, "dtype": args.dtype, "device": args.device,
           "unet_params_M": round(unet_params / 1e6, 1), "au_adapter_params_M": round(sum(p.numel() for p in sd.au_adapter.parameters()) / 1e6, 1),
           "cross_attention_blocks": count_cross_attention(sd.unet), "build_s": round(time.time() - t0, 1)}
    reqs = [SampleRequest(index=i, seed=i, expression="happy", aus=L.au_dict(L.sample_aus("happy", i)), prompt="a photo of a happy person")
            for i in range(args.batch)]

    if not args.no_feranno:
        x = np.random.default_rng(0).integers(0, 255, (args.batch, args.size, args.size, 3), dtype=np.uint8)
        aus = np.stack([L.au_vector(r.aus) for r in reqs]).astype(np.float32)
        cfg = FERAnnoConfig(condition="generic", t=1)
        max_res = default_max_res([gen.latent_shape()[-1]])
        with tempfile.TemporaryDirectory() as tmp:
            extract_dataset(sd, x, aus, [r.prompt for r in reqs], cfg, list(range(args.batch)), max_res, folder=tmp, progress=False)
            files = {n: os.path.getsize(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
        header = 128  # each .npy file's header
        out["feranno_max_res"] = max_res
        out["feranno_cache_bytes_per_image"] = sum(b - header for b in files.values()) // args.batch
        imgs = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
        feats, att = extract(sd, imgs, [cfg.generic_prompt] * args.batch, torch.zeros(args.batch, len(L.AU_KEYS)), [0] * args.batch)
        old_f, _ = align_capture(feats, att, 8, "nearest")
        out["feranno_old_cache_bytes_per_image"] = (sum(f[0].numel() for f in old_f) + sum(a[0].numel() for a in att.values())) * 2
        f8, a8 = align_capture(feats, att, 8, "scale")
        out["feranno_cache_bytes_per_image_max_res_8"] = sum(v[0].numel() for v in f8 + a8) * 2
        out["feature_sides"] = [f.shape[-1] for f in feats]
        out["attention_groups"] = {int(k): int(v.shape[1]) for k, v in att.items()}
        del feats, att, old_f

    if args.no_guidance:
        print(json.dumps(out))
        return

    class MeanColour(torch.nn.Module):  # a differentiable 8-class stand-in for the guidance classifier (negligible memory)
        label_space = "affectnet8"

        def forward(self, images):
            return images.mean(dim=(2, 3)) @ torch.linspace(-1, 1, 24, device=images.device).view(3, 8)

    text, au_t = gen.conditions(reqs)
    x_t = gen.initial_latents(reqs)
    t = gen.timesteps()[20]
    guidance = SemanticGuidance(gen, MeanColour(), reqs, au_t, GuidanceConfig(start=0.0, micro_batch=args.micro_batch))
    t1 = time.time()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        guidance(20, t, x_t, text)
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - before
    else:
        with PeakRSS() as peak:
            guidance(20, t, x_t, text)
        used = peak.peak - peak.start
    out["guidance_s"] = round(time.time() - t1, 1)
    out["guidance_peak_bytes"] = int(used)
    out["guidance_peak_GiB_per_image"] = round(used / 2 ** 30 / args.batch, 3)
    out["rss_GiB"] = round(rss_bytes() / 2 ** 30, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
