"""A learned restorer for generated faces, as a data lever (issue 18): sharpen what the tiny generator blurs.

    OMP_NUM_THREADS=1 python bench/restore_probe.py train out/recon out/fetext-procedural out/restorer.pt   # ~10 min
    OMP_NUM_THREADS=1 python bench/restore_probe.py apply out/restorer.pt out/synth-d0.85 out/synth-d0.85-restored

`train` fits a small residual CNN on pairs (the generator's rendition of a real face, from
bench/reconstruct_real.py; the real face at the benchmark's 32 px), L1 loss. `apply` writes a copy of a
dataset folder with every image passed through it (metadata unchanged), for `synfer benchmark downstream`.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

SIZE = 32


def net(width: int = 32, blocks: int = 4):
    import torch.nn as nn

    class Restorer(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(3, width, 3, padding=1)
            self.body = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                                    nn.Conv2d(width, width, 3, padding=1)) for _ in range(blocks))
            self.tail = nn.Conv2d(width, 3, 3, padding=1)

        def forward(self, x):
            h = self.head(x)
            for b in self.body:
                h = h + b(h)
            return x + self.tail(h)

    return Restorer()


def load(folder: Path, files):
    from PIL import Image

    out = []
    for f in files:
        with Image.open(folder / f) as im:
            im = im.convert("RGB")
            out.append(np.asarray(im if im.size == (SIZE, SIZE) else im.resize((SIZE, SIZE), Image.BICUBIC)))
    return np.stack(out)


def rows(folder: Path):
    from synfer.engine.dataset import read_metadata

    return read_metadata(folder)


def train(a):
    import torch
    from tqdm import tqdm

    torch.manual_seed(0)
    rs = rows(Path(a.pairs))
    x = torch.from_numpy(load(Path(a.pairs), [r["file_name"] for r in rs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(load(Path(a.real), [r["layout_source"] for r in rs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    hold = len(x) // 10  # the last tenth is held out
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.iters)
    g = torch.Generator().manual_seed(0)
    for _ in tqdm(range(a.iters), desc="restorer"):
        idx = torch.randint(0, len(x) - hold, (64,), generator=g)
        xb, yb = x[idx], y[idx]
        if torch.rand(1, generator=g) < 0.5:
            xb, yb = xb.flip(3), yb.flip(3)
        loss = (model(xb) - yb).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        xh, yh = x[-hold:], y[-hold:]
        print(f"held-out L1 on [-1, 1]: generator {float((xh - yh).abs().mean()):.4f}, restored {float((model(xh) - yh).abs().mean()):.4f}")
    torch.save(model.state_dict(), a.out)


def apply(a):
    import torch
    from PIL import Image

    model = net()
    model.load_state_dict(torch.load(a.weights))
    src, dst = Path(a.dataset), Path(a.out)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    rs = rows(src)
    for j in range(0, len(rs), 256):
        part = rs[j:j + 256]
        x = torch.from_numpy(load(src, [r["file_name"] for r in part])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            y = ((model(x).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for r, im in zip(part, y):
            Image.fromarray(im).save(dst / r["file_name"])
    shutil.copy(src / "metadata.jsonl", dst / "metadata.jsonl")
    print(f"{len(rs)} images restored into {dst}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("pairs")
    t.add_argument("real")
    t.add_argument("out")
    t.add_argument("--iters", type=int, default=2000)
    p = sub.add_parser("apply")
    p.add_argument("weights")
    p.add_argument("dataset")
    p.add_argument("out")
    a = ap.parse_args()
    train(a) if a.cmd == "train" else apply(a)


if __name__ == "__main__":
    main()
