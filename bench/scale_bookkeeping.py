"""Issue 46: the bookkeeping of a run folder at the paper's scale (5x AffectNet, ~1.4M images).

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale_bookkeeping.py --rows 100000 --work /tmp/synfer-scale \
        --json bench/results/scale-bookkeeping.json

Builds a run folder of N rows of the quickstart (its 16 seed samples repeated, images hard-linked),
then runs each command in a child process and records its wall time and peak RSS (`os.wait4`):
- resume: `synfer run` of the same recipe with num_images=N+8: the time until the first batch is
  generated (a `SYNFER_CRASH_AT=generate:1` run, killed there), and the whole run (8 new images,
  merge, grid, report; evaluators off: they are timed on their own);
- merge of the rows spread over 2 and 8 ranks' parts (`synfer merge`);
- `synfer report`, `synfer eval --evaluators diversity` (a cheap evaluator), `synfer calibrate` with
  the quickstart's tiny-cnn expert only (FERAnno's UNet pass per image would measure the UNet, not the
  bookkeeping), and `datasets.load_dataset("imagefolder")` (the folder's load time, `--datasets`).
Each is also run on the 16-row seed folder (or an empty one for the resume): the "empty-folder cost"
that the issue's bounds are stated against. The merge and calibrate folders share the images of the
main folder through a symlinked `images/` (only the bookkeeping is measured).
Nothing here writes into the repository but the --json file.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart.yaml"
# the quickstart without its out/ inputs (layout source, FID reference): nothing here reads the repo's out/
OVERRIDES = ["generator.layout.enabled=false", "evaluators=[]"]
CALIBRATE = ["calibrator=null"]  # tiny-cnn alone votes: the bookkeeping, not FERAnno's UNet, is what is timed
SEED_ROWS = 16
CHUNK = 16  # the sd generator's chunk: how rows are spread over ranks' parts


def synfer(*args: str) -> list[str]:
    return [sys.executable, "-m", "synfer", *args]


def measure(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Wall seconds and peak RSS (MB) of one child process."""
    t0 = time.perf_counter()
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=out, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if log:
        out.close()
    rc = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "rc": rc}


def seed_folder(work: Path) -> Path:
    seed = work / "seed"
    if not (seed / "metadata.jsonl").exists():
        shutil.rmtree(seed, ignore_errors=True)
        r = measure(synfer("run", str(RECIPE), f"num_images={SEED_ROWS}", f"output={seed}", *OVERRIDES), log=work / "log.txt")
        if r["rc"] != 0:
            sys.exit(f"the seed run failed; see {work / 'log.txt'}")
    return seed


def templates(seed: Path) -> list[str]:
    """One JSON line per seed row with placeholders for its file name and index."""
    rows = [json.loads(line) for line in (seed / "metadata.jsonl").read_text().splitlines()]
    return [json.dumps({**r, "file_name": "@FILE@", "index": 987654321987}) + "\n" for r in rows]


def line(tpls: list[str], i: int) -> str:
    return tpls[i % len(tpls)].replace('"@FILE@"', f'"images/{i:08d}.png"', 1).replace("987654321987", str(i), 1)


def build(seed: Path, folder: Path, n: int, parts: int = 0, images: Path | None = None) -> Path:
    """A run folder of n rows: metadata.jsonl (parts=0) or `parts` ranks' parts; images hard-linked from the
    seed's, or `images/` a symlink to another folder's."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(seed / "recipe.json", folder / "recipe.json")
    if images is not None:
        (folder / "images").symlink_to(images.resolve())
    else:
        (folder / "images").mkdir()
        srcs = [str(seed / "images" / f"{i:08d}.png") for i in range(SEED_ROWS)]
        for i in range(n):
            os.link(srcs[i % SEED_ROWS], folder / "images" / f"{i:08d}.png")
    tpls = templates(seed)
    if parts:
        (folder / ".parts").mkdir()
        files = [open(folder / ".parts" / f"rank-{r:05d}.jsonl", "w") for r in range(parts)]
        for i in range(n):
            files[(i // CHUNK) % parts].write(line(tpls, i))
        for f in files:
            f.close()
    else:
        with open(folder / "metadata.jsonl", "w") as f:
            for i in range(n):
                f.write(line(tpls, i))
    return folder


def datasets_load(folder: Path, cache: Path) -> list[str]:
    code = ("import sys, datasets; datasets.disable_progress_bars(); "
            f"ds = datasets.load_dataset('imagefolder', data_dir=sys.argv[1], split='train', cache_dir={str(cache)!r}); "
            "print(len(ds))")
    return [sys.executable, "-c", code, str(folder)]


STEPS = ("resume", "report", "eval", "merge", "calibrate")


def bench(work: Path, n: int, with_datasets: bool, log: Path, skip: tuple[str, ...] = (), only: tuple[str, ...] = STEPS) -> dict:
    seed = seed_folder(work)
    skip = tuple(skip) + tuple(s for s in STEPS if s not in only)
    res: dict = {"rows": n}
    t0 = time.perf_counter()
    main = build(seed, work / f"rows-{n}", n)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    run = ["run", str(RECIPE), *OVERRIDES]
    if "resume" not in skip:
        res["resume_first_batch"] = measure(synfer(*run, f"num_images={n + 8}", f"output={main}"), {"SYNFER_CRASH_AT": "generate:1"}, log)
        res["resume"] = measure(synfer(*run, f"num_images={n + 8}", f"output={main}"), log=log)
    if "report" not in skip:
        res["report"] = measure(synfer("report", str(main)), log=log)
    if "eval" not in skip:
        res["eval_diversity"] = measure(synfer("eval", str(main), "--evaluators", "diversity"), log=log)
    if with_datasets:
        res["datasets_load"] = measure(datasets_load(main, work / "hf-cache"), {"HF_DATASETS_CACHE": str(work / "hf-cache")}, log)
        shutil.rmtree(work / "hf-cache", ignore_errors=True)
    for ranks in (2, 8) if "merge" not in skip else ():
        folder = build(seed, work / f"merge-{n}-{ranks}", n, parts=ranks, images=main / "images")
        res[f"merge_{ranks}_ranks"] = measure(synfer("merge", str(folder)), log=log)
        shutil.rmtree(folder)
    if "calibrate" not in skip:  # tiny-cnn votes on every image: ~1.5 ms an image on one core
        folder = build(seed, work / f"calibrate-{n}", n, images=main / "images")
        res["calibrate"] = measure(synfer("calibrate", str(folder), str(RECIPE), *OVERRIDES, *CALIBRATE), log=log)
        shutil.rmtree(folder)
    shutil.rmtree(main)
    return res


def baseline(work: Path, with_datasets: bool, log: Path) -> dict:
    """The same commands on an empty output (resume) or the 16-row seed folder (the rest)."""
    seed = seed_folder(work)
    res: dict = {"rows": SEED_ROWS}
    empty = work / "empty"
    run = ["run", str(RECIPE), *OVERRIDES, "num_images=8"]
    shutil.rmtree(empty, ignore_errors=True)
    res["resume_first_batch"] = measure(synfer(*run, f"output={empty}"), {"SYNFER_CRASH_AT": "generate:1"}, log)
    shutil.rmtree(empty, ignore_errors=True)
    res["resume"] = measure(synfer(*run, f"output={empty}"), log=log)
    shutil.rmtree(empty, ignore_errors=True)
    copy = build(seed, work / "seed-copy", SEED_ROWS)
    res["report"] = measure(synfer("report", str(copy)), log=log)
    res["eval_diversity"] = measure(synfer("eval", str(copy), "--evaluators", "diversity"), log=log)
    if with_datasets:
        res["datasets_load"] = measure(datasets_load(copy, work / "hf-cache"), {"HF_DATASETS_CACHE": str(work / "hf-cache")}, log)
        shutil.rmtree(work / "hf-cache", ignore_errors=True)
    for ranks in (2, 8):
        folder = build(seed, work / f"merge-seed-{ranks}", SEED_ROWS, parts=ranks, images=copy / "images")
        res[f"merge_{ranks}_ranks"] = measure(synfer("merge", str(folder)), log=log)
        shutil.rmtree(folder)
    res["calibrate"] = measure(synfer("calibrate", str(copy), str(RECIPE), *OVERRIDES, *CALIBRATE), log=log)
    shutil.rmtree(copy)
    return res


def machine() -> dict:
    mem = next((int(line.split()[1]) // 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), None)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mb": mem, "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def git_head() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/synfer-scale"))
    ap.add_argument("--json", type=Path, default=None, help="append this session's results to this JSON file")
    ap.add_argument("--label", default="", help="what code was measured (e.g. 'before issue 46')")
    ap.add_argument("--datasets", action="store_true", help="also time datasets.load_dataset('imagefolder')")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], choices=["calibrate"], help="leave these out of the N-row cases")
    ap.add_argument("--only", nargs="*", default=list(STEPS), choices=STEPS, help="run just these on the N-row folders")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "log.txt"
    session = {"date": datetime.date.today().isoformat(), "label": args.label, "commit": git_head(), "machine": machine(),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": []}
    if not args.no_baseline:
        session["results"].append({"case": "baseline", **baseline(args.work, args.datasets, log)})
        print(json.dumps(session["results"][-1]), flush=True)
    for n in args.rows:
        session["results"].append({"case": f"{n} rows", **bench(args.work, n, args.datasets, log, tuple(args.skip), tuple(args.only))})
        print(json.dumps(session["results"][-1]), flush=True)
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([*old, session], indent=2) + "\n")


if __name__ == "__main__":
    main()
