"""Layout inversion then denoising, per scheduler: mean abs reconstruction error of real FEText faces
(guidance 1, zero AUs, the layout prompt) on the shipped tiny model. Compares the DDIM inversion onto
the solver's grid (what `invert` does) with DPM-Solver++'s own inverse scheduler.

    OMP_NUM_THREADS=1 python bench/inversion_error.py [--faces 8] [--source out/fetext-quick]
    OMP_NUM_THREADS=1 python bench/inversion_error.py --schedulers ddim --steps 25 --depths 0.85 --calls 21 10 6 4 2 1
    (--calls: `layout.inversion_steps`, UNet calls on a coarser grid to the same depth; 0 = one per step)
"""
import argparse
import json

import torch

from synfer_plugins.sd.generator import SDGenerator
from synfer_plugins.sd.sampling import LayoutConfig, LayoutInit, invert


def own_dpm_inversion(g, images, prompts, aus, num_steps, steps):
    """DPMSolverMultistepInverseScheduler for `num_steps` of `steps` (its grid is not the forward one's)."""
    from diffusers import DPMSolverMultistepInverseScheduler

    m = g.load()
    inv = DPMSolverMultistepInverseScheduler.from_config(m.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
    inv.set_timesteps(steps)
    with torch.no_grad():
        lat = m.encode_image(images)
        text = m.encode_text(prompts)
        for t in inv.timesteps[:num_steps]:
            lat = inv.step(m.predict_noise(lat, t, text, aus), t, lat).prev_sample
    return lat, steps - num_steps, [int(t) for t in inv.timesteps[:num_steps + 1]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=int, default=8)
    ap.add_argument("--source", default="out/fetext-quick")
    ap.add_argument("--steps", type=int, nargs="*", default=[25, 12, 8])
    ap.add_argument("--depths", type=float, nargs="*", default=[1.0, 0.85])
    ap.add_argument("--schedulers", nargs="*", default=["ddim", "dpm++", "unipc"])
    ap.add_argument("--calls", type=int, nargs="*", default=[0])
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for sched in a.schedulers:
        g = SDGenerator(SDGenerator.Config(scheduler=sched, guidance_scale=1.0, device="cpu"))
        layout = LayoutInit(g, LayoutConfig(enabled=True, source=a.source, expressions=None))
        images = layout.load_images(layout.files[:a.faces], g.size)
        prompts = [layout.cfg.prompt] * len(images)
        aus = torch.zeros(len(images), 16)
        text = g.load().encode_text(prompts)
        for steps in a.steps:
            for depth in a.depths:
                num = max(1, min(steps, int(round(depth * steps))))
                methods = {f"ddim-inversion{f'-{c}-calls' if c else ''}": lambda c=c: invert(g, images, prompts, aus, num, steps, calls=c or None)
                           for c in a.calls}
                if sched == "dpm++":
                    methods["own-inverse"] = lambda: own_dpm_inversion(g, images, prompts, aus, num, steps)[:2]
                for how, fn in methods.items():
                    x_t, start = fn()
                    with torch.no_grad():
                        rec = g.decode(g.denoise(x_t, text, aus, start_step=start, steps=steps))
                    err = float((rec.clamp(-1, 1) - images).abs().mean())
                    rows.append({"scheduler": sched, "inversion": how, "steps": steps, "depth": depth, "mean_abs_error": round(err, 4)})
                    print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
