"""What synfer's generator costs against a bare diffusers StableDiffusionPipeline, one process (issue 16).

Random weights with SD 1.5's exact topology (synfer_plugins.sd.testing): `--width full` is SD 1.5's size
(UNet 859.5M parameters), `--width narrow` the CPU stand-in. The same components (shared modules) serve
every row; rows, each at `--batch` images per call, `--steps` DDIM steps, classifier-free guidance 4:

- bare: `StableDiffusionPipeline(prompt, ...)`, PIL output;
- synfer: `SDGenerator.generate` with batched UNet calls, no guidance;
- + layout: layout initialization (DDIM inversion of a face, depth 0.6);
- + guidance vae / approx: semantic guidance (Eq. 4-6, start 0.3, tiny-cnn classifier) decoding x0 with the
  VAE or with an ApproxDecoder (random weights here: only its cost is measured);
- full recipe vae / approx: AU adapter + layout + guidance, as recipes/sd15-affectnet8.yaml.

Columns: images/s (after one warm-up call), ratio to bare, peak memory (GPU: max_memory_allocated;
CPU: peak RSS above the level before the row), FLOP per image (torch.utils.flop_counter on one image,
forward + backward), and achieved FLOP/s against `--peak-tflops` (the GPU's dense bf16 peak; on a CPU a
float32 matmul measured here). `--compile` adds rows with `torch.compile` on the UNet; `--micro-batch N` rows with the guided backward
run N samples at a time; `--reuse-forward` rows with `semantic_guidance.reuse_forward` (one UNet forward fewer per guided step).

    python bench/bench_gpu.py --device cuda --width full --size 512 --steps 25 --batch 8 16 --dtype bfloat16 --peak-tflops 989
    OMP_NUM_THREADS=1 python bench/bench_gpu.py --device cpu --width narrow --size 128 --steps 10 --batch 4 --dtype float32

Prints one JSON line per row and a markdown table at the end (`--out FILE` also writes the JSON list).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CLASSES = ["happy", "sad", "anger", "surprise", "fear", "disgust", "neutral", "contempt"]


def matmul_peak(device, dtype, n: int = 1024, reps: int = 10) -> float:
    """Measured matmul FLOP/s of this device and dtype (the CPU's 'peak')."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def flop_counter():
    """A dispatch mode summing torch.utils.flop_counter's formulas (matmul, conv, attention, forward and backward).
    FlopCounterMode itself also tracks modules with backward hooks, which autograd.grad (guidance) refuses."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Flops(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

        def get_total_flops(self):
            return self.total

    return Flops()


def fake_fetext(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    from synfer import labels as L
    from synfer.engine.dataset import DatasetWriter

    w = DatasetWriter(folder)
    rng = np.random.default_rng(0)
    for i in range(n):
        e = CLASSES[i % len(CLASSES)]
        w.write(i, Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)),
                {"expression": e, "aus": L.au_dict(L.sample_aus(e, i)), "caption": f"a photo of a {e} person"})
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--width", default="full", choices=["full", "narrow"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per row (after one warm-up)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (H100/H200 bf16: 989); default: measured matmul")
    ap.add_argument("--compile", action="store_true", help="also rows with torch.compile on the UNet")
    ap.add_argument("--micro-batch", type=int, nargs="*", default=[],
                    help="also the approx-guidance rows at these semantic_guidance.micro_batch values (the recipe's is 4)")
    ap.add_argument("--reuse-forward", action="store_true",
                    help="also the approx-guidance rows with semantic_guidance.reuse_forward (at each micro-batch given)")
    ap.add_argument("--rows", nargs="*", default=None, help="only these rows")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    from diffusers import StableDiffusionPipeline

    from sd15_memory import PeakRSS
    from synfer import labels as L
    from synfer.stages import SampleRequest
    from synfer_plugins.sd.approx_decoder import ApproxDecoder
    from synfer_plugins.sd.au_adapter import AUAdapter
    from synfer_plugins.sd.generator import SDGenerator
    from synfer_plugins.sd.model import SDModel
    from synfer_plugins.sd.sampling import LayoutConfig
    from synfer_plugins.sd.testing import sd15_components
    from synfer_plugins.tiny_cnn import TinyCNN

    dev, dtype = args.device, getattr(torch, args.dtype)
    cuda = dev.startswith("cuda")
    prompts = [f"a photo of a {e} person" for e in CLASSES] + ["a photo of a person", ""]
    parts = sd15_components(prompts, args.width, sample_size=args.size)
    sd = SDModel(parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"], parts["vae"])
    sd.to(dev, dtype)
    for m in (sd.unet, sd.text_encoder, sd.vae):
        m.requires_grad_(False).eval()
    approx = ApproxDecoder(4, args.size // 8, 64).to(dev, dtype).eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    clf = TinyCNN(TinyCNN.Config(device=dev))
    tmp = tempfile.mkdtemp(prefix="bench-gpu-")
    faces = fake_fetext(Path(tmp) / "fetext", 16, args.size)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak(dev, dtype)
    env = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
           "width": args.width, "size": args.size, "steps": args.steps, "dtype": args.dtype, "peak_tflops": round(peak / 1e12, 4),
           "peak_source": "given" if args.peak_tflops else "measured matmul", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(env), flush=True)

    def generator(layout=False, guidance=None, decoder="vae", micro_batch=None, reuse=False):
        cfg = {"steps": args.steps, "guidance_scale": 4.0, "device": dev, "dtype": args.dtype, "size": args.size, "channels_last": False,
               "layout": {"enabled": layout, "source": str(faces), "expressions": None},
               "semantic_guidance": {"start": 0.3, "decoder": decoder}}  # micro_batch: the recipe default (4) unless given
        if micro_batch:
            cfg["semantic_guidance"]["micro_batch"] = micro_batch
        if reuse:
            cfg["semantic_guidance"]["reuse_forward"] = True
        fields = SDGenerator.Config.model_fields
        layout_fields = LayoutConfig.model_fields  # every layout face inverted in every call, as the FLOP count has it: no
        cfg["layout"].update({k: v for k, v in (("cache_mb", 0), ("bank", False)) if k in layout_fields})  # RAM or disk reuse
        if "exact_batching" in fields:
            cfg["exact_batching"] = False
        for name in ("batch_size", "max_batch"):
            if name in fields:
                cfg[name] = 1024
        gen = SDGenerator(SDGenerator.Config(**cfg))
        gen.model = sd
        gen._approx_decoder = approx

        def run(reqs):
            if "chunk" in fields:  # one UNet batch of the measured size, like the bare pipeline (issue 17: chunks
                gen.config = gen.config.model_copy(update={"chunk": len(reqs)})  # pad a smaller call to the chunk)
            return gen.generate(reqs, guidance=guidance)
        return run

    def bare(reqs):
        g = [torch.Generator().manual_seed(r.seed) for r in reqs]
        return pipe([r.prompt for r in reqs], num_inference_steps=args.steps, guidance_scale=4.0, height=args.size, width=args.size,
                    generator=g, output_type="pil").images

    rows = {"bare": bare, "synfer": generator(), "+ layout": generator(layout=True),
            "+ guidance vae": generator(guidance=clf), "+ guidance approx": generator(guidance=clf, decoder="approx")}
    full = {"full recipe vae": dict(layout=True, guidance=clf), "full recipe approx": dict(layout=True, guidance=clf, decoder="approx")}
    for mb in args.micro_batch:
        rows[f"+ guidance approx (micro-batch {mb})"] = generator(guidance=clf, decoder="approx", micro_batch=mb)
        full[f"full recipe approx (micro-batch {mb})"] = dict(layout=True, guidance=clf, decoder="approx", micro_batch=mb)
    if args.reuse_forward:
        for mb in [None, *args.micro_batch]:
            tag = " (reuse forward" + (f", micro-batch {mb})" if mb else ")")
            rows["+ guidance approx" + tag] = generator(guidance=clf, decoder="approx", micro_batch=mb, reuse=True)
            full["full recipe approx" + tag] = dict(layout=True, guidance=clf, decoder="approx", micro_batch=mb, reuse=True)

    def requests(n, offset=0):
        return [SampleRequest(index=offset + i, seed=offset + i, expression=CLASSES[i % 8], aus=L.au_dict(L.sample_aus(CLASSES[i % 8], i)),
                              prompt=f"a photo of a {CLASSES[i % 8]} person") for i in range(n)]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    results = []

    def measure(name, fn, batch):
        if args.rows and name not in args.rows:
            return
        fn(requests(batch, 10_000))  # warm-up (and compilation)
        sync()
        inference_mode = torch.inference_mode
        torch.inference_mode = torch.no_grad  # dispatch modes see nothing under inference_mode (synfer's unguided denoising)
        try:
            with flop_counter() as counter:
                fn(requests(1, 20_000))
        finally:
            torch.inference_mode = inference_mode
        flops = counter.get_total_flops()
        if cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            for k in range(args.repeats):
                fn(requests(batch, k * batch))
            sync()
        dt = time.perf_counter() - t0
        mem = (torch.cuda.max_memory_allocated() - base) if cuda else (rss.peak - rss.start)
        ips = args.repeats * batch / dt
        row = {"row": name, "batch": batch, "images_per_s": round(ips, 4), "peak_mem_GiB": round(mem / 2 ** 30, 3),
               "tflop_per_image": round(flops / 1e12, 5), "tflops_achieved": round(flops * ips / 1e12, 4),
               "of_peak": round(flops * ips / peak, 4)}
        results.append(row)
        print(json.dumps(row), flush=True)

    for batch in args.batch:
        for name, fn in rows.items():
            measure(name, fn, batch)
        if args.compile:
            eager_unet = sd.unet
            compiled = torch.compile(eager_unet, dynamic=False)  # static graphs per shape: the flop-count call at batch 1
            # would otherwise switch the timed batch to a slower dynamic-shape graph
            sd.unet = pipe.unet = compiled
            try:
                for name in ("bare", "synfer"):
                    measure(name + " (compiled UNet)", rows[name], batch)
            except Exception as exc:  # noqa: BLE001 (recorded, not fatal: the eager rows stand)
                print(json.dumps({"row": "compile", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}), flush=True)
            finally:
                sd.unet = pipe.unet = eager_unet
    sd.set_au_adapter(AUAdapter.for_unet(sd.unet))  # last: attaching it changes the UNet's attention processors
    for batch in args.batch:
        for name, kw in full.items():
            measure(name, generator(**kw), batch)

    bare_ips = {r["batch"]: r["images_per_s"] for r in results if r["row"] == "bare"}
    print(f"\n{env['device']}, {args.width} width, {args.size} px, {args.steps} steps, {args.dtype}; peak {env['peak_tflops']} TFLOP/s "
          f"({env['peak_source']}); {env['date']}\n")
    print("| row | batch | images/s | x bare | peak mem GiB | TFLOP/image | of peak |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratio = r["images_per_s"] / bare_ips[r["batch"]] if r["batch"] in bare_ips else float("nan")
        r["ratio_to_bare"] = round(ratio, 3)
        print(f"| {r['row']} | {r['batch']} | {r['images_per_s']:.3g} | {ratio:.2f} | {r['peak_mem_GiB']:.3g} | {r['tflop_per_image']:.3g} | "
              f"{100 * r['of_peak']:.1f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
