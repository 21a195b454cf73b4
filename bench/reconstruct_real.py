"""The generator's rendition of real faces: invert each FEText face and denoise it with its own caption and AUs (issue 18).

    OMP_NUM_THREADS=1 python bench/reconstruct_real.py out/fetext-procedural out/recon --per-class 300   # ~25 min

Writes a dataset folder (images/ + metadata.jsonl, the real face's label and AUs, `layout_source` the face it
came from) that `synfer benchmark downstream synthetic=OUT` trains on like any synthetic set. Trained on these, a
classifier sees real faces' content (identity, pose, expression, AUs) through the generator's rendering only, so
the gap between it and real-only training is what the rendering costs, apart from what the sampled content costs.
The settings are the issue-18 sets' (12 DDIM steps, layout depth 0.85, classifier-free guidance 1); no semantic
guidance (the face already shows its expression). Resumable: faces already on disk are skipped.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def pick_rows(rows, per_class: int):
    from synfer.engine.dataset import row_label

    taken: dict[str, int] = {}
    out = []
    for r in rows:
        c = row_label(r)
        if c and taken.get(c, 0) < per_class:
            taken[c] = taken.get(c, 0) + 1
            out.append(r)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="FEText folder of real faces")
    ap.add_argument("output")
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--depth", type=float, default=0.85)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="generator model folder (default: the shipped tiny-sd)")
    a = ap.parse_args()

    from tqdm import tqdm

    from synfer.engine.dataset import DatasetWriter, read_metadata, row_label
    from synfer.labels import sample_seed
    from synfer.stages import SampleRequest
    from synfer_plugins.sd.generator import SDGenerator

    rows = pick_rows(read_metadata(Path(a.source)), a.per_class)
    writer = DatasetWriter(a.output)  # resumable: `done` holds the faces already on disk
    g = SDGenerator(SDGenerator.Config(model=a.model, steps=a.steps, guidance_scale=1.0, device="cpu",
                                       layout={"enabled": True, "source": a.source, "depth": a.depth}))
    g._layout().pick = lambda r: r.layout_source  # each request inverts its own face, not a random one of its class
    c = g.chunk
    todo = [i for i in range(len(rows)) if i not in writer.done]
    with tqdm(total=len(rows), initial=len(rows) - len(todo), desc="reconstruct") as bar:
        for k in sorted({i // c for i in todo}):
            idx = [i for i in range(k * c, min((k + 1) * c, len(rows))) if i not in writer.done]
            reqs = [SampleRequest(index=i, seed=sample_seed(a.seed, i), expression=row_label(rows[i]), aus=rows[i]["aus"],
                                  prompt=rows[i]["caption"], layout_source=rows[i]["file_name"]) for i in idx]
            writer.write_many([(s.request.index, s.image, record(rows[s.request.index])) for s in g.generate(reqs)])
            bar.update(len(idx))


def record(row: dict) -> dict:
    """The metadata of a face's rendition: the real face's label and AUs, and which face it came from."""
    from synfer.engine.dataset import row_label

    return {"label": row_label(row), "expression": row_label(row), "aus": row["aus"], "prompt": row["caption"], "kept": True,
            "layout_source": row["file_name"]}


if __name__ == "__main__":
    main()
