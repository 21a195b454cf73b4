"""Issue 17 items 2-3: steps x scheduler x guidance schedule on the quickstart recipe.

One output folder per cell (out/sweep/<cell>/); a cell whose metrics at this n are already in the
results JSON is skipped, and a half-generated cell resumes (synfer run skips samples on disk), so the
sweep can be stopped and restarted, and a cell grown from n=128 to 256 generates only samples 128-255
(per-sample seeds, batches of 16 in index order: the first 128 are the same files either way).
Images/s on a shared machine follows its load; images per CPU-second (the run's own CPU time, one
thread) is what compares across cells. Each cell: `synfer run` the quickstart with the
cell's overrides (evaluators off: images/s covers layout init, guidance, FERAnno + expert vote
and writing), then `synfer eval` (oracle FER accuracy, AU F1/accuracy, FID against
out/fetext-quick-test, diversity, label quality).

    OMP_NUM_THREADS=1 python bench/sweep_solvers.py --n 512 --cells ddim-25-full dpm++-12-full
    OMP_NUM_THREADS=1 python bench/sweep_solvers.py --n 256 --cells unipc-8-every2 ...
    python bench/sweep_solvers.py --table            # print the table of what is in the JSON

A cell name is [cfg<X>-]<scheduler>-<steps>-<guidance schedule>[-inv<K>][-bf16]; schedules are in SCHEDULES. Cells
without a cfg prefix run at classifier-free guidance 4, as the quickstart did when they were first measured;
cells without -bf16 pin generator.forward_dtype off (float32 throughout, as every cell before it existed).
The sweep of 2026-12-02 ran with `generator.exact_batching=false` (batch 16), retired since; cells now
run at the default `generator.chunk=16`, the same UNet batch shape (batching changes bytes, not quality).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "sweep-solvers.json"
SCHEDULES = {  # semantic_guidance overrides, explicit so that a cell does not follow the recipe's own setting
    "full": [],  # today's (until the sweep): every step from 30% of the steps on, lambda_g 1
    "every2": ["generator.semantic_guidance.every=2"],
    "every3": ["generator.semantic_guidance.every=3"],
    "win": ["generator.semantic_guidance.stop=0.7"],
    "none": ["generator.semantic_guidance.enabled=false"],
    # fewer guided steps at the same total push on the embedding: lambda_g x guided steps ~ today's 1 x 17
    "lg1.5": ["generator.semantic_guidance.lambda_g=1.5"],
    "lg2": ["generator.semantic_guidance.lambda_g=2"],
    "lg3": ["generator.semantic_guidance.lambda_g=3"],
    "e2lg2": ["generator.semantic_guidance.every=2", "generator.semantic_guidance.lambda_g=2"],
    "e3lg3": ["generator.semantic_guidance.every=3", "generator.semantic_guidance.lambda_g=3"],
    # the same, the guided step's own forward reused to denoise it (one UNet forward fewer per guided step)
    "e3lg3r": ["generator.semantic_guidance.every=3", "generator.semantic_guidance.lambda_g=3", "generator.semantic_guidance.reuse_forward=true"],
    "e2lg3": ["generator.semantic_guidance.every=2", "generator.semantic_guidance.lambda_g=3"],
    "e2lg4": ["generator.semantic_guidance.every=2", "generator.semantic_guidance.lambda_g=4"],
    "u2": ["generator.semantic_guidance.updates=2"],
}
BASE = ["generator.semantic_guidance.every=1", "generator.semantic_guidance.lambda_g=1", "generator.semantic_guidance.stop=1",
        "generator.layout.bank=false"]
# the guidance settings every cell starts from (the quickstart's before the sweep; it now guides every 3rd step at 3).
# The cells in bench/results/sweep-solvers.json ran against that recipe without BASE, which is the same. No layout bank:
# a cell would otherwise read the faces an earlier cell with the same inversion settings inverted, and time less work.
METRICS = ("fer_accuracy", "au_f1", "au_accuracy", "fid", "diversity", "label_quality")


def cell_overrides(cell: str) -> list[str]:
    """A cell is [cfg<X>-]<scheduler>-<steps>-<schedule>[-inv<K>][-bf16]: classifier-free guidance X (4 when absent, the
    quickstart's when the sweep ran), layout inversion in K UNet calls (`layout.inversion_steps`; absent: one per step),
    the gradient-free UNet passes under bfloat16 autocast (`generator.forward_dtype`)."""
    m = re.fullmatch(r"(?:cfg(?P<cfg>[\d.]+)-)?(?P<sched>[a-z+]+)-(?P<steps>\d+)-(?P<schedule>[\w.]+?)(?:-inv(?P<inv>\d+))?(?P<bf16>-bf16)?", cell)
    if not m or m["schedule"] not in SCHEDULES:
        raise SystemExit(f"cell {cell!r}: expected [cfg<X>-]<scheduler>-<steps>-<schedule>[-inv<K>][-bf16], schedule one of {sorted(SCHEDULES)}")
    extra = [] if m["sched"] == "ddim" else [f"generator.scheduler={m['sched']}"]  # ddim: today's recipe, untouched
    extra += [f"generator.guidance_scale={float(m['cfg'] or 4)}"] + ([f"generator.layout.inversion_steps={m['inv']}"] if m["inv"] else [])
    extra += [f"generator.forward_dtype={'bfloat16' if m['bf16'] else 'null'}"]  # pinned: the recipe's auto would follow the CPU
    return [f"generator.steps={int(m['steps'])}", *extra, *BASE, *SCHEDULES[m["schedule"]]]


def synfer(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "synfer"
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def run_cell(cell: str, n: int, recipe: str, out_root: Path) -> dict:
    out = out_root / cell
    args = [recipe, f"num_images={n}", f"output={out}", "generator.chunk=16", "evaluators=[]", "report=false",
            "grid=false", *cell_overrides(cell)]
    t, cpu = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = synfer("-q", "run", *args)
    wall, after = time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)  # the run's own CPU time: what a shared machine's load does not inflate
    if done.returncode != 0:
        raise SystemExit(f"cell {cell} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    m = re.search(r"(\d+) generated now, (\d+) already on disk, ([\d.]+) s", done.stdout + done.stderr)
    generated, resumed, seconds = (int(m.group(1)), int(m.group(2)), float(m.group(3))) if m else (None, None, wall)
    ev = synfer("eval", str(out), "--reference", "out/fetext-quick-test")
    if ev.returncode != 0:
        raise SystemExit(f"eval of {cell} failed:\n{ev.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"cell": cell, "n": n, "output": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
            "generated_now": generated, "resumed": resumed, "gen_seconds": round(seconds, 1),
            "images_per_s": round(generated / seconds, 4) if generated else None, "cpu_seconds": round(cpu_s, 1),
            "images_per_cpu_s": round(generated / cpu_s, 4) if generated else None,
            "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} synfer run {' '.join(args)}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_after": os.getloadavg()[0],
            "metrics": {k: v for k, v in metrics.items()}}


def load(path: Path = RESULTS) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def table(results: dict) -> str:
    head = "| cell | overrides | n | FER acc (oracle) | AU F1 | AU acc | FID | diversity | img/s (wall) | img per CPU-s |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(results.items(), key=lambda kv: (kv[1]["n"], kv[0])):
        m = r["metrics"]
        get = lambda k: m.get(k, float("nan"))  # noqa: E731
        over = " ".join(o.replace("generator.", "").replace("semantic_guidance.", "sg.") for o in cell_overrides(r["cell"]) if o not in BASE and o != "generator.forward_dtype=null")
        lines.append(f"| {r['cell']} | `{over}` | {r['n']} | {get('fer_accuracy'):.3f} | {get('au_f1'):.3f} | {get('au_accuracy'):.3f} | "
                     f"{get('fid'):.2f} | {get('diversity'):.3f} | {r['images_per_s'] or float('nan'):.3f} | {r.get('images_per_cpu_s') or float('nan'):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="*", default=[])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--out", default="out/sweep")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--results", default=str(RESULTS), help="the results JSON (another file: time cells again on another host)")
    a = ap.parse_args()
    path = Path(a.results)
    results = load(path)
    for cell in a.cells:
        key = f"{cell}-n{a.n}"
        if key in results:
            print(f"{key}: done, skipped")
            continue
        print(f"{key}: running", flush=True)
        cell_result = run_cell(cell, a.n, a.recipe, ROOT / a.out)
        results = {**load(path), key: cell_result}  # re-read: sweeps of other cells may run side by side
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, sort_keys=True))
        r = results[key]
        print(f"{key}: {r['images_per_s']} img/s, {json.dumps(r['metrics'])}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
