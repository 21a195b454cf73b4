"""Speed of `synfer run` on the shipped tiny model, and where the time goes.

    python bench/bench_speed.py                       # everything, ~10 min on 2 cores
    python bench/bench_speed.py --only e2e --n 64     # one section
    python bench/bench_speed.py --only headline --n 128 --quality   # today's full quickstart beside the new default

Sections (each prints a table; all numbers land in bench/results/speed.json):
  peak     torch float32 matmul GFLOP/s on this machine (the reference for "fraction of peak")
  unet     the tiny UNet's FLOPs per CFG pass (torch.utils.flop_counter) and achieved GFLOP/s
  e2e      `synfer run recipes/quickstart.yaml` images/s, one fresh process per variant
           (weights loading, prompts, PNG + metadata writing included), with peak RSS
  headline the full quickstart (layout, guidance, calibration, written files) as it was before
           issue 17 (one sample per UNet call = generator.chunk=1, 25 DDIM steps, torch's default
           threads) beside the quickstart as it is now (threads: auto), cold (every face inverted in
           the run) and warm (the faces already in the layout bank from an earlier run), in the same run; with
           --quality, each output's oracle FER accuracy, label quality and FID (`synfer eval`)
           (give an --n that is a multiple of the chunk, 16: a short chunk is padded to 16 slots); with
           --long N, also the default on N images from an empty layout bank (a dataset-sized run)
  chunks   the full quickstart at 1 thread, one sample per UNet call (chunk 1, the old exact path)
           against chunks of 16 (the default), same steps, same run
  bare     the same weights in a bare diffusers StableDiffusionPipeline loop (same steps,
           batch size, CFG scale and AU tokens), and our overhead ratio against it
  batch    images/s against generator.chunk (the UNet batch shape; batch_size only groups chunks)
  procs    1 process x 2 threads, 1 x 1, and torchrun 2 processes x 1 thread

Every run is a subprocess, so peak memory is per variant and imports are not shared.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "speed.json"

PLAIN = ["guidance_classifier=null", "calibrator=null", "experts=[]", "evaluators=[]", "generator.layout.enabled=false",
         "grid=false", "report=false"]
ONE = ["generator.chunk=1"]  # one sample per UNet call: what generator.exact_batching=true (retired) did
QUICK_FACES = ["generator.layout.source=out/fetext-quick", "generator.layout.bank=false"]  # each timed run a first run on its
# faces: no layout bank filled by an earlier variant (the headline times the warm bank on purpose)
VARIANTS = {  # name -> overrides on recipes/quickstart.yaml
    "text+AU, batched (no layout, guidance, calibration)": PLAIN + ["generator.chunk=16"],
    "text+AU, one sample per UNet call (chunk 1)": PLAIN + ONE,
    "+ layout init (batched)": [o for o in PLAIN if "layout" not in o] + ["generator.chunk=16", *QUICK_FACES],
    "+ semantic guidance (batched)": [o for o in PLAIN if "guidance_classifier" not in o] + ["generator.chunk=16"],
    "+ calibration: FERAnno + tiny-cnn (batched)": [o for o in PLAIN if o not in ("calibrator=null", "experts=[]")]
    + ["generator.chunk=16"],
    "full quickstart (layout, guidance, calibration; chunk 1)": ["evaluators=[]", "grid=false", "report=false", *QUICK_FACES] + ONE,
}
FULL = ["evaluators=[]", "grid=false", "report=false"]  # the full method; metrics come from `synfer eval` afterwards


def before_issue_17(threads: int | None = None) -> list[str]:
    """Overrides that give back the quickstart as it ran before issue 17: one sample per UNet call, 25 DDIM
    steps, classifier-free guidance 4 (the quickstart's until 2026-12-03), semantic guidance (lambda_g 1) at every
    step from 30% on, torch's default thread count. Settings added since (a scheduler,
    guidance every k steps) are named only where this checkout's sd Config has them."""
    from synfer_plugins.sd.generator import SDGenerator
    from synfer_plugins.sd.sampling import GuidanceConfig, LayoutConfig

    fields, guidance = SDGenerator.Config.model_fields, GuidanceConfig.model_fields
    old = ONE + ["generator.steps=25", "generator.guidance_scale=4.0", "generator.semantic_guidance.start=0.3",
                 "generator.semantic_guidance.lambda_g=1.0", f"threads={threads or os.cpu_count() or 1}"]
    old += ["generator.scheduler=ddim"] if "scheduler" in fields else []
    old += ["generator.semantic_guidance.every=1"] if "every" in guidance else []
    old += ["generator.semantic_guidance.stop=1.0"] if "stop" in guidance else []
    old += ["generator.forward_dtype=null"] if "forward_dtype" in fields else []  # float32 throughout, as then
    old += ["generator.layout.bank=false"] if "bank" in LayoutConfig.model_fields else []  # every face inverted, as then
    return old


RUN_ONE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from synfer.engine.recipe import load_recipe
from synfer.engine.pipeline import run_recipe
from synfer.engine.threads import configure
recipe = load_recipe("recipes/quickstart.yaml", sys.argv[1:])
threads = configure(recipe.threads)  # as `synfer run` does at start-up
t1 = time.perf_counter()
s = run_recipe(recipe, progress=False)
t2 = time.perf_counter()
print(json.dumps({"images": s.generated, "run_s": t2 - t1, "import_s": t1 - t0, "threads": threads, "output": recipe.output,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

BARE = r"""
import json, resource, sys, time
import torch
n, bs, steps, cfg = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
t1 = time.perf_counter()
from diffusers import StableDiffusionPipeline
from synfer_plugins.sd.model import SDModel, TINY_MODEL_DIR
m = SDModel.from_pretrained(TINY_MODEL_DIR)
pipe = StableDiffusionPipeline(vae=None, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet, scheduler=m.scheduler,
                               safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
pipe.vae_scale_factor = 1  # pixel space: the "latents" are the image
pipe.set_progress_bar_config(disable=True)
prompt = "The person looks happy. A young person with short brown hair and light skin. The cheeks are raised."
aus = torch.zeros(bs, 16); aus[:, [5, 8]] = 0.8  # AU6 + AU12, the same tokens' cost as synfer's
done = 0
while done < n:
    b = min(bs, n - done)
    out = pipe([prompt] * b, height=32, width=32, num_inference_steps=steps, guidance_scale=cfg, output_type="latent",
               ip_adapter_image_embeds=[torch.cat([torch.zeros(b, 16), aus[:b]])[:, None]],
               generator=[torch.Generator().manual_seed(done + i) for i in range(b)]).images
    images = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # the same last step as synfer's to_pil
    done += b
t2 = time.perf_counter()
print(json.dumps({"images": done, "run_s": t2 - t1, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _py(code: str, *args, env=None, launcher=None) -> dict:
    """Run `code` (or a `launcher` command line) with `args`; its last JSON line of output. A None in `env` unsets."""
    cmd = (launcher or [sys.executable, "-c", code]) + [str(a) for a in args]
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def run_variant(overrides: list[str], n: int, threads: int | None = None, world: int = 1, out: str | None = None) -> dict:
    out = out or tempfile.mkdtemp(prefix="synfer-bench-")
    args = [f"num_images={n}", f"output={out}/ds", *overrides]
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    if world > 1:
        script = Path(out) / "run_one.py"
        script.write_text(RUN_ONE)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), str(script)]
        t0 = time.perf_counter()
        res = _py(RUN_ONE, *args, env=env, launcher=launcher)
        res["run_s"] = time.perf_counter() - t0  # wall of the whole torchrun, startup included
        res["images"] = n
    else:
        res = _py(RUN_ONE, *args, env=env)
    res["img_s"] = res["images"] / res["run_s"]
    return res


def matmul_peak(sizes=(1024, 2048), repeats: int = 5) -> dict:
    import torch

    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        best[n] = 2 * n ** 3 / min(times) / 1e9
    return {"threads": torch.get_num_threads(), "gflops_by_size": best, "peak_gflops": max(best.values())}


def unet_speed(batch_sizes=(1, 16), repeats: int = 10) -> list[dict]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from synfer_plugins.sd.model import TINY_MODEL_DIR, SDModel

    m = SDModel.from_pretrained(TINY_MODEL_DIR)
    m.unet.eval()
    rows = []
    for bs in batch_sizes:
        b = 2 * bs  # classifier-free guidance: conditional + unconditional in one call
        x = torch.randn(b, 3, 32, 32)
        text = torch.randn(b, m.max_length, m.text_encoder.config.hidden_size)
        aus = torch.rand(b, 16)
        t = torch.tensor(500)
        with torch.inference_mode():
            with FlopCounterMode(display=False) as fc:
                m.predict_noise(x, t, text, aus)
            flops = fc.get_total_flops()
            m.predict_noise(x, t, text, aus)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                m.predict_noise(x, t, text, aus)
                times.append(time.perf_counter() - t0)
        med = sorted(times)[len(times) // 2]
        rows.append({"batch": bs, "unet_batch": b, "gflop": flops / 1e9, "ms": med * 1e3, "gflops": flops / med / 1e9})
    return rows


def headline(args, results) -> None:
    """Today's full quickstart (before issue 17) beside the new default, same n, same machine, same run.
    OMP/MKL_NUM_THREADS are unset for both, so `threads` (the recipe's) decides as `synfer run` would."""
    unset = {"OMP_NUM_THREADS": None, "MKL_NUM_THREADS": None}
    rows = {"before issue 17 (chunk 1, 25 DDIM steps, default threads)": before_issue_17(args.before_threads),
            "quickstart default now, cold (no face inverted before: generator.layout.bank=false)": ["generator.layout.bank=false"],
            "quickstart default now, warm (every face drawn already in the layout bank)": []}
    results["headline"] = {"n": args.n, "load_before": os.getloadavg()[0]}
    print(f"| full quickstart, {args.n} images | images/s | wall s | threads | peak RSS MB |"
          + (" oracle FER acc | label quality | FID |" if args.quality else "") + "\n|---|---|---|---|---|" + ("---|---|---|" if args.quality else ""))
    for name, overrides in rows.items():
        out = tempfile.mkdtemp(prefix="synfer-headline-")
        run = [f"num_images={args.n}", "generator.layout.source=out/fetext-quick", *FULL, *overrides]
        if "warm" in name:  # an earlier run (untimed) banks the faces this one draws
            _py(RUN_ONE, *run, f"output={out}/fill", env=unset)
        r = _py(RUN_ONE, *run, f"output={out}/ds", env=unset)
        r["img_s"], r["overrides"] = r["images"] / r["run_s"], overrides
        line = f"| {name} | {r['img_s']:.2f} | {r['run_s']:.1f} | {r['threads']} | {r['peak_rss_mb']:.0f} |"
        if args.quality:
            r["metrics"] = _py(EVAL, f"{out}/ds", env={**unset, "OMP_NUM_THREADS": "1"})
            m = r["metrics"]
            line += f" {m.get('fer_accuracy', float('nan')):.3f} | {m.get('label_quality', float('nan')):.3f} | {m.get('fid', float('nan')):.2f} |"
        results["headline"][name] = r
        print(line, flush=True)
    if args.long:
        long_run(args, results, unset)
    results["headline"]["load_after"] = os.getloadavg()[0]
    print(f"load average (1 min) before {results['headline']['load_before']:.2f}, after {results['headline']['load_after']:.2f}")


def long_run(args, results, unset) -> None:
    """The default on a dataset-sized run (--long images, e.g. 4,096: 4 samples per quickstart face) from an empty
    layout bank: a copy of the faces in a new folder, so no face was inverted before this run. Its first --n images
    must be byte-identical to the cold row's (the bank only skips repeated inversions), so its quality is that row's."""
    import hashlib
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="synfer-headline-long-"))
    shutil.copytree(ROOT / "out/fetext-quick", tmp / "faces", ignore=shutil.ignore_patterns("work"))
    r = _py(RUN_ONE, f"num_images={args.long}", f"generator.layout.source={tmp / 'faces'}", *FULL, f"output={tmp}/ds", env=unset)
    r["img_s"] = r["images"] / r["run_s"]

    def digest(folder: str, n: int) -> str:
        names = sorted(Path(folder, "images").iterdir())[:n]
        return hashlib.md5(b"".join(f.read_bytes() for f in names)).hexdigest()

    cold = next(v for k, v in results["headline"].items() if k.startswith("quickstart default now, cold"))
    r["first_n_identical_to_cold"] = digest(f"{tmp}/ds", args.n) == digest(cold["output"], args.n)
    results["headline"][f"quickstart default now, {args.long} images from an empty layout bank"] = r
    print(f"| quickstart default now, {args.long} images from an empty layout bank | {r['img_s']:.2f} | {r['run_s']:.1f} | "
          f"{r['threads']} | {r['peak_rss_mb']:.0f} | (first {args.n} images byte-identical to the cold row's: "
          f"{r['first_n_identical_to_cold']}) |", flush=True)


EVAL = r"""
import json, sys
from synfer.engine.evaluate import evaluate_dataset
m = evaluate_dataset(sys.argv[1], "out/fetext-quick-test", ["fer-accuracy", "label-quality", "fid"])
print(json.dumps(m))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128, help="images per end-to-end variant")
    ap.add_argument("--only", default=None, help="peak | unet | e2e | headline | chunks | bare | batch | procs")
    ap.add_argument("--before-threads", type=int, default=None, help="headline: threads of the before-issue-17 run "
                    "(default: the cores, torch's own default then)")
    ap.add_argument("--long", type=int, default=0, help="headline: also time the default on this many images from an "
                    "empty layout bank (a dataset-sized run, e.g. 4096: each quickstart face drawn 4 times)")
    ap.add_argument("--quality", action="store_true", help="headline: also evaluate each output (oracle FER accuracy, FID, ...)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}

    def want(name):
        return args.only in (None, name)

    if want("peak"):
        results["peak"] = matmul_peak()
        print(f"matmul peak: {results['peak']['peak_gflops']:.1f} GFLOP/s ({results['peak']['threads']} threads)")
    if want("unet"):
        results["unet"] = unet_speed()
        peak = results.get("peak", {}).get("peak_gflops")
        print("| batch (x2 for CFG) | GFLOP per call | ms per call | GFLOP/s | of matmul peak |\n|---|---|---|---|---|")
        for r in results["unet"]:
            r["of_peak"] = r["gflops"] / peak if peak else None
            share = f"{r['of_peak']:.0%}" if peak else "(run --only peak)"
            print(f"| {r['batch']} ({r['unet_batch']}) | {r['gflop']:.2f} | {r['ms']:.1f} | {r['gflops']:.1f} | {share} |")
    if want("e2e"):
        results["e2e"] = {}
        print(f"| variant ({args.n} images, 25 DDIM steps, CFG 4) | images/s | wall s | peak RSS MB |\n|---|---|---|---|")
        for name, overrides in VARIANTS.items():
            r = run_variant(overrides, args.n)
            results["e2e"][name] = r
            print(f"| {name} | {r['img_s']:.2f} | {r['run_s']:.1f} | {r['peak_rss_mb']:.0f} |", flush=True)
    if want("headline"):
        headline(args, results)
    if want("chunks"):
        results["chunks"] = {}
        print(f"| full quickstart, {args.n} images, 1 thread | images/s | wall s |\n|---|---|---|")
        for c in (1, 16):
            r = run_variant(FULL + [*QUICK_FACES, f"generator.chunk={c}", "threads=1"], args.n)
            results["chunks"][c] = r
            print(f"| generator.chunk={c} | {r['img_s']:.2f} | {r['run_s']:.1f} |", flush=True)
    if want("bare"):
        bs = 16
        bare = _py(BARE, args.n, bs, 25, 4.0)
        bare["img_s"] = bare["images"] / bare["run_s"]
        ours = results.get("e2e", {}).get(next(iter(VARIANTS))) or run_variant(VARIANTS[next(iter(VARIANTS))], args.n)
        results["bare"] = {"diffusers": bare, "synfer": ours, "overhead": bare["img_s"] / ours["img_s"]}
        print(f"bare StableDiffusionPipeline: {bare['img_s']:.2f} img/s; synfer run (same settings): {ours['img_s']:.2f} img/s; "
              f"overhead {results['bare']['overhead']:.2f}x")
    if want("batch"):
        results["batch"] = {}
        print("| generator.chunk (= batch_size) | images/s |\n|---|---|")
        for bs in (1, 4, 16, 64):
            r = run_variant(PLAIN + [f"generator.chunk={bs}", f"generator.batch_size={bs}"], args.n)
            results["batch"][bs] = r
            print(f"| {bs} | {r['img_s']:.2f} |", flush=True)
    if want("procs"):
        results["procs"] = {}
        print("| processes x threads | images/s |\n|---|---|")
        for label, threads, world in (("1 x 2", 2, 1), ("1 x 1", 1, 1), ("2 x 1 (torchrun)", 1, 2)):
            r = run_variant(VARIANTS[next(iter(VARIANTS))], args.n, threads=threads, world=world)
            results["procs"][label] = r
            print(f"| {label} | {r['img_s']:.2f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
