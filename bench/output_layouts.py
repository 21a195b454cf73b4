"""Issue 42, item 4: a run folder's image layouts at scale, flat `images/` against `images_per_folder`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/output_layouts.py --images 100000 --work /tmp/synfer-layouts \
        --json bench/results/output-layouts.json

For each layout (flat, and sub-folders of N images each, in --layouts order) a fresh folder gets N tiny images (8x8 RGB
PNG, each its own pixels) written as a run writes them: `DatasetWriter.write_many` in batches of --batch (every
image renamed into place, one `os.sync()`, one metadata append per batch). Then, per layout:
- files per folder (the largest folder, and how many there are);
- write throughput (images/s, wall clock of the writes);
- reopen: `DatasetWriter(folder)` as a resume opens it (every listed image checked on disk);
- walk: listing every file with `os.walk` (what a copy or an upload does first);
- `datasets.load_dataset("imagefolder", data_dir=...)` in a child process: wall seconds and peak RSS, its cache
  under --work (offline: nothing is downloaded).
The folders are written one after the other and deleted after their measures; the files are in the page cache
when they are read (the same for every layout). Nothing here writes into the repository but the --json file.
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
sys.path.insert(0, str(REPO))

CLASSES = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"]


def tiny(i: int):
    from PIL import Image

    return Image.frombytes("RGB", (8, 8), bytes((i * 7 + k * 13) % 256 for k in range(8 * 8 * 3)))


def write(folder: Path, n: int, per_folder: int | None, batch: int) -> dict:
    from synfer.engine.dataset import DatasetWriter

    w = DatasetWriter(folder, images_per_folder=per_folder)
    tiny(0)  # imports done before the clock starts
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        w.write_many([(i, tiny(i), {"preassigned_label": CLASSES[i % 8], "label": CLASSES[i % 8], "kept": True})
                      for i in range(start, min(start + batch, n))])
    wall = time.perf_counter() - t0
    return {"write_s": round(wall, 2), "images_per_s": round(n / wall, 1)}


def folders(folder: Path) -> dict:
    t0 = time.perf_counter()
    counts = [sum(1 for f in files if not f.startswith(".")) for _, _, files in os.walk(folder / "images")]
    counts = [c for c in counts if c]
    return {"walk_s": round(time.perf_counter() - t0, 3), "folders": len(counts), "max_files_per_folder": max(counts),
            "files": sum(counts)}


def reopen(folder: Path, n: int, per_folder: int | None) -> dict:
    from synfer.engine.dataset import DatasetWriter

    t0 = time.perf_counter()
    w = DatasetWriter(folder, images_per_folder=per_folder)
    wall = time.perf_counter() - t0
    assert len(w.done) == n, (len(w.done), n)
    return {"reopen_s": round(wall, 3)}


def datasets_load(folder: Path, cache: Path, n: int) -> dict:
    code = ("import sys, datasets; datasets.disable_progress_bars(); "
            "ds = datasets.load_dataset('imagefolder', data_dir=sys.argv[1], split='train', cache_dir=sys.argv[2]); "
            "assert len(ds) == int(sys.argv[3]), len(ds); ds[len(ds) - 1]['image'].load(); print(len(ds))")
    env = {**os.environ, "HF_HOME": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(cache), str(n)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()[-2000:]
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        sys.exit(f"datasets load of {folder} failed:\n{err}")
    return {"datasets_load_s": round(wall, 2), "datasets_peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--layouts", nargs="+", default=["flat", "10000", "1000"],
                    help="in this order: 'flat', or an images_per_folder value")
    ap.add_argument("--batch", type=int, default=64, help="images per write_many (one os.sync each)")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (deleted at the end)")
    ap.add_argument("--no-datasets", action="store_true", help="skip the datasets load")
    ap.add_argument("--json", type=Path, help="append this record to a JSON list")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=False)  # never into a folder that holds something else
    results = []
    try:
        for per_folder in [None if x == "flat" else int(x) for x in args.layouts]:
            name = "flat" if per_folder is None else f"images_per_folder={per_folder}"
            folder = args.work / name.replace("=", "-")
            res = {"layout": name, "images": args.images}
            res.update(write(folder, args.images, per_folder, args.batch))
            res.update(folders(folder))
            res.update(reopen(folder, args.images, per_folder))
            if not args.no_datasets:
                res.update(datasets_load(folder, args.work / "hf", args.images))
                shutil.rmtree(args.work / "hf", ignore_errors=True)
            print(json.dumps(res), flush=True)
            results.append(res)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    record = {"date": datetime.date.today().isoformat(), "commit": commit,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "memory_mb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20,
                          "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "")},
              "command": "python " + " ".join([f"bench/{Path(__file__).name}", *sys.argv[1:]]),
              "batch": args.batch, "results": results, "note": args.note}
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(old + [record], indent=1) + "\n")


if __name__ == "__main__":
    main()
