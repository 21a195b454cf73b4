"""A sharded run at 100k images: killed, resumed under torchrun, merged, and loaded in `datasets`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/sharded_run.py --images 100000 --work /tmp/synfer-sharded \
        --json bench/results/sharded-run.json

The test suite's dummy generator and expert (tests/dummy_plugins.py: per-seed noise images, 16 px) stand in
for the diffusion model, so what is measured is synfer's own path at this size: the run loop, the
`images_per_folder` layout, the kill (SYNFER_CRASH_AT at the Kth write of rank 0), the resume and merge of
two torchrun ranks, and the load. One uninterrupted single-process run of the same recipe is the
reference: the killed-and-resumed two-rank folder must hold the same files, byte for byte.
Nothing here writes into the repository but the --json file.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dummy_site(work: Path) -> Path:
    """A fake installed distribution declaring the dummy plugins (as tests/conftest.py's make_dist)."""
    info = work / "site" / "synfer_dummy-0.0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: synfer-dummy\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[synfer]\ndummy = dummy_plugins\n")
    return work / "site"


def recipe(work: Path, out: Path, n: int, per_folder: int) -> Path:
    path = work / f"{out.name}.yaml"
    path.write_text(json.dumps({"seed": 3, "num_images": n, "output": str(out), "images_per_folder": per_folder,
                                "grid": False, "report": False, "evaluators": [],
                                "generator": {"plugin": "dummy", "batch_size": 256},
                                "experts": [{"plugin": "dummy-expert"}]}))
    return path


def run(cmd: list[str], env: dict, log: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return round(time.perf_counter() - t0, 1), rc


def digest(folder: Path) -> tuple[str, int, int]:
    """sha256 over every image (relative path and bytes) and metadata.jsonl; the image count; the most files in a folder."""
    h, count, most = hashlib.sha256(), 0, 0
    for dirpath, dirs, files in sorted(os.walk(folder / "images")):
        dirs.sort()
        pngs = sorted(f for f in files if f.endswith(".png"))
        most = max(most, len(pngs))
        for name in pngs:
            p = Path(dirpath) / name
            h.update(p.relative_to(folder).as_posix().encode() + b"\0" + p.read_bytes())
            count += 1
    h.update((folder / "metadata.jsonl").read_bytes())
    return h.hexdigest(), count, most


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--per-folder", type=int, default=10_000)
    ap.add_argument("--kill-at", type=int, default=100, help="rank 0 is killed at its Kth write (of 256-image batches)")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (deleted at the end)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "log.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(dummy_site(work)), os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1"}
    env.pop("SYNFER_CRASH_AT", None)
    synfer = [sys.executable, "-m", "synfer", "run"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "synfer", "run"]
    res: dict = {"images": args.images, "images_per_folder": args.per_folder}
    one, two = work / "one", work / "two"
    res["one_process_s"], rc = run([*synfer, str(recipe(work, one, args.images, args.per_folder))], env, log)
    assert rc == 0, log.read_text()[-3000:]
    r2 = recipe(work, two, args.images, args.per_folder)
    res["two_ranks_killed_s"], rc = run(torchrun + [str(r2)], {**env, "SYNFER_CRASH_AT": f"write:{args.kill_at}"}, log)
    assert rc != 0, "the kill did not happen"
    parts = list((two / ".parts").glob("*.jsonl")) if (two / ".parts").exists() else []
    res["images_before_resume"] = sum(1 for _ in (two / "images").rglob("*.png"))
    res["parts_before_resume"] = len(parts)
    res["two_ranks_resume_s"], rc = run(torchrun + [str(r2)], env, log)
    assert rc == 0, log.read_text()[-3000:]
    (ha, na, most), (hb, nb, _) = digest(one), digest(two)
    res.update({"identical": ha == hb, "images_written": na, "images_resumed_folder": nb, "most_files_in_a_folder": most,
                "folders": sum(1 for p in (two / "images").iterdir() if p.is_dir())})
    code = ("import sys, time, datasets; datasets.disable_progress_bars(); t = time.perf_counter(); "
            "ds = datasets.load_dataset('imagefolder', data_dir=sys.argv[1], split='train', cache_dir=sys.argv[2]); "
            "print(len(ds), round(time.perf_counter() - t, 1))")
    out = subprocess.run([sys.executable, "-c", code, str(two), str(work / "hf")], env=env, capture_output=True, text=True)
    rows, seconds = out.stdout.split()[-2:]
    res.update({"datasets_rows": int(rows), "datasets_load_s": float(seconds)})
    print(json.dumps(res), flush=True)
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() else []
        mem = next((int(line.split()[1]) // 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), None)
        session = {"date": datetime.date.today().isoformat(), "machine": {"cores": os.cpu_count(), "memory_mb": mem},
                   "command": " ".join([Path(sys.executable).name, *sys.argv]), "result": res}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([*old, session], indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
