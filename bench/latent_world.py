"""A latent model in the procedural world, to judge `semantic_guidance.decoder: approx` on quality (issue 16 item 2).

    OMP_NUM_THREADS=1 python bench/latent_world.py all        # every stage below, each resumable
    OMP_NUM_THREADS=1 python bench/latent_world.py eval --n 512

Stages (each a `synfer` command, printed before it runs; a stage whose output exists is skipped):
  base       an SD 1.5-topology folder with random weights at 64 px ("narrow": UNet 32/64/64/64 on
             8x8x4 latents, VAE 32/32/64/64), its CLIP BPE learnt from the FEText captions
  vae        synfer train vae: the VAE from scratch on FEText faces (MSE + small KL)
  generator  synfer train generator: the UNet + text encoder on the VAE's cached latents
  approx     synfer train approx-decoder: the small conv decoder distilled from that VAE, at 64 px, on the
             model's x0 estimates and the guidance classifier's gradient (--classifier tiny-cnn)
  eval       synfer run of the same N samples three times (no guidance; guidance with the `vae`
             decode; with the `approx` decode), then synfer eval: oracle FER accuracy of each,
             and the gain of each decoder over no guidance. JSON: bench/results/latent-guidance.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYNFER = [sys.executable, "-m", "synfer"]
RESULTS = ROOT / "bench" / "results" / "latent-guidance.json"


def sh(args: list[str]) -> None:
    print("$", " ".join(map(str, args)), flush=True)
    t = time.time()
    subprocess.run([*map(str, args)], check=True, cwd=ROOT)
    print(f"  ({time.time() - t:.0f} s)", flush=True)


def resume(work: Path) -> list[str]:
    """--resume when a stage's work dir exists (an interrupted training)."""
    return ["--resume"] if work.exists() else []


def stage_base(a) -> None:
    if (a.out / "base" / "model_index.json").exists():
        return
    from synfer.engine.dataset import read_metadata
    from synfer_plugins.sd.testing import build_sd15

    captions = [r["caption"] for r in read_metadata(a.data)] + ["", "a photo of a happy person"]
    build_sd15(a.out / "base", captions, "narrow", sample_size=64)
    print(f"wrote {a.out / 'base'}")


def stage_vae(a) -> None:
    if not (a.out / "vae" / "vae" / "config.json").exists():
        sh([*SYNFER, "train", "vae", "--model", a.out / "base", "--data", a.data, "--out", a.out / "vae", "--iters", a.vae_iters,
            "--batch-size", 16, "--lr", 1e-3, "--threads", 1, "--log-interval", 25, "--checkpoint-interval", 100,
            "--work-dir", a.out / "work-vae", *resume(a.out / "work-vae")])


def stage_generator(a) -> None:
    if not (a.out / "gen" / "unet" / "config.json").exists():
        sh([*SYNFER, "train", "generator", "--model", a.out / "vae", "--data", a.data, "--out", a.out / "gen", "--iters", a.gen_iters,
            "--batch-size", 32, "--lr", 1e-3, "--threads", 1, "--log-interval", 50, "--checkpoint-interval", 250,
            "--train-text-encoder", "--ema", "--snr-gamma", 5,
            "--work-dir", a.out / "work-gen", *resume(a.out / "work-gen")])


def stage_approx(a) -> None:
    if not (a.out / "gen" / "approx_decoder" / "config.json").exists():
        grad = ["--classifier", a.approx_classifier, "--draws", a.approx_draws] if a.approx_classifier != "none" else []
        sh([*SYNFER, "train", "approx-decoder", "--model", a.out / "gen", "--data", a.approx_data or a.data, "--iters", a.approx_iters,
            "--width", a.approx_width, *grad, "--threads", 1])


VARIANTS = {
    "none": ["generator.semantic_guidance.enabled=false"],
    "vae": ["generator.semantic_guidance.decoder=vae"],
    "approx": ["generator.semantic_guidance.decoder=approx"],
}


def stage_eval(a) -> None:
    rows = {}
    for name, extra in VARIANTS.items():
        out = a.out / f"eval-{a.n}-{name}"
        t = time.time()
        sh([*SYNFER, "run", "recipes/quickstart.yaml", f"generator.model={a.out / 'gen'}", f"num_images={a.n}", f"output={out}",
            "calibrator=null", "experts=[]", "evaluators=[]", "grid=false", "report=false", "threads=1", *extra])
        secs = time.time() - t
        sh([*SYNFER, "eval", out, "--evaluators", "fer-accuracy,diversity"])
        metrics = json.loads((out / "metrics.json").read_text())
        rows[name] = {"overrides": extra, "fer_accuracy": metrics["fer_accuracy"], "diversity": metrics.get("diversity"),
                      "n": metrics.get("fer_accuracy_n"), "run_s": round(secs, 1)}
    for name in ("vae", "approx"):
        rows[name]["gain"] = rows[name]["fer_accuracy"] - rows["none"]["fer_accuracy"]
    ratio = rows["approx"]["gain"] / rows["vae"]["gain"] if rows["vae"]["gain"] else float("nan")
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "n": a.n, "model": str(a.out / "gen"),
              "rows": rows, "approx_gain_over_vae_gain": ratio, "command": " ".join(sys.argv)}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


STAGES = {"base": stage_base, "vae": stage_vae, "generator": stage_generator, "approx": stage_approx, "eval": stage_eval}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=[*STAGES, "all"])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "latent-world")
    ap.add_argument("--data", type=Path, default=ROOT / "out" / "fetext-procedural", help="FEText faces the VAE and UNet learn")
    ap.add_argument("--approx-data", type=Path, default=None, help="FEText faces the approx decoder learns on (default: --data)")
    ap.add_argument("--approx-width", type=int, default=128)
    ap.add_argument("--approx-classifier", default="tiny-cnn",
                    help="guidance classifier whose gradient the approx decoder learns to pass ('none': pixels only)")
    ap.add_argument("--approx-draws", type=int, default=2, help="x0 estimates per face for the approx decoder")
    ap.add_argument("--vae-iters", type=int, default=1500)
    ap.add_argument("--gen-iters", type=int, default=3000)
    ap.add_argument("--approx-iters", type=int, default=2000)
    ap.add_argument("--n", type=int, default=512)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name, fn in STAGES.items():
        if a.stage in (name, "all"):
            fn(a)


if __name__ == "__main__":
    main()
