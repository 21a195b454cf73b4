"""The self-supervised paradigm of the downstream benchmark (paper Table 2, Fig. 6a-b).

A small SimCLR encoder (Chen et al. 2020: two augmented views per image, NT-Xent loss on a
projection head) is pretrained at 32x32 on real faces, synthetic faces, or both, for the same
number of steps each; then a linear probe (multinomial logistic regression on the frozen,
standardised encoder features) is fit on the labelled real training faces and tested on the
held-out real faces (and on the second held-out split when the recipe names one). Rows are
`ssl-real` (scale 0), `ssl-synthetic` and `ssl-real+synthetic` (synthetic = scale x the real
set), written to `ssl.json` in the format of downstream.json (synfer.commands.downstream); the command is `synfer benchmark ssl RECIPE` (synfer.commands.benchmark).

The real pretraining set is the same per-seed subset of `real_per_class` faces per class the
supervised rows train on; labels are used only by the probe. No torch at import time.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from synfer.commands import downstream as B
from synfer.commands.downstream import SSL_SETTINGS, SSLConfig
from synfer.contract import labels as L
from synfer.engine.dataset import write_json
from synfer.engine.seeds import stream_rng


def build_encoder(width: int):
    """3 stride-2 stages (32 -> 4 px), global average pool: features of size 2 x width."""
    from torch import nn  # heavy

    def block(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    w = width
    return nn.Sequential(block(3, w // 2, 2), block(w // 2, w), block(w, w, 2), block(w, 2 * w), block(2 * w, 2 * w, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def to_tensor(images):
    """uint8 (N,H,W,3) -> float (N,3,H,W) in [-1, 1]."""
    import torch  # heavy

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def augment(x, gen, crop_area: float = 0.35):
    """SimCLR views on a batch: random resized crop (area crop_area-1, aspect 3/4-4/3) with horizontal flip
    through one affine grid, brightness/contrast/saturation jitter, random grayscale (p 0.2)."""
    import torch  # heavy
    import torch.nn.functional as F  # heavy

    n = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    area, logr = u(crop_area, 1.0), u(math.log(3 / 4), math.log(4 / 3))
    sx, sy = (area * logr.exp()).sqrt().clamp(max=1), (area / logr.exp()).sqrt().clamp(max=1)
    tx, ty = u(-1, 1) * (1 - sx), u(-1, 1) * (1 - sy)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    v = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="reflection", align_corners=False)
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    v = (v - mean) * u(0.6, 1.4, 1, 1, 1) + mean + u(-0.3, 0.3, 1, 1, 1)  # contrast, brightness
    gray = v.mean(1, keepdim=True)
    sat = torch.where(torch.rand(n, 1, 1, 1, generator=gen) < 0.2, torch.zeros(n, 1, 1, 1), u(0.5, 1.5, 1, 1, 1))
    return ((v - gray) * sat + gray).clamp(-1, 1)


def nt_xent(z1, z2, temperature: float):
    """SimCLR's NT-Xent: each view's positive is the other view of its image; the other 2N-2 are negatives."""
    import torch  # heavy
    import torch.nn.functional as F  # heavy

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def pretrain(images, cfg: SSLConfig, seed: int):
    """SimCLR on uint8 images (N,H,W,3); -> (encoder in eval mode, [loss per step])."""
    import torch  # heavy
    from torch import nn  # heavy

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    enc = build_encoder(cfg.width)
    head = nn.Sequential(nn.Linear(2 * cfg.width, 2 * cfg.width), nn.ReLU(inplace=True), nn.Linear(2 * cfg.width, cfg.proj_dim))
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    x_all = to_tensor(images)
    bs = min(cfg.batch_size, len(x_all))
    losses = []
    enc.train(), head.train()
    for _ in range(cfg.steps):
        x = x_all[torch.randperm(len(x_all), generator=gen)[:bs]]
        loss = nt_xent(head(enc(augment(x, gen, cfg.crop_area))), head(enc(augment(x, gen, cfg.crop_area))), cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return enc.eval(), losses


def embed(enc, images, batch_size: int = 512):
    import torch  # heavy

    with torch.no_grad():
        return torch.cat([enc(to_tensor(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def linear_probe(f_train, y_train, num_classes: int, iters: int, weight_decay: float, seed: int):
    """Multinomial logistic regression on standardised features (full batch, L-BFGS); -> features -> class."""
    import torch  # heavy
    import torch.nn.functional as F  # heavy

    torch.manual_seed(seed)
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    xs, y = (f_train - mu) / sd, torch.as_tensor(y_train)
    lin = torch.nn.Linear(xs.shape[1], num_classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xs), y) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda f: lin((f - mu) / sd).argmax(1).numpy()


def pretraining_set(setting: str, x_real, x_syn):
    return {"ssl-real": x_real, "ssl-synthetic": x_syn, "ssl-real+synthetic": np.concatenate([x_real, x_syn])}[setting]


def run_ssl(cfg, echo=print) -> dict:
    """Every (seed, setting, scale): pretrain, probe on the real training subset, test; writes ssl.json + ssl.png."""
    import torch  # heavy


    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    (x_real, y_real), (x_syn, y_syn, _), tests = B.load_sets(cfg, echo)
    s = cfg.ssl
    plan = ([("ssl-real", 0.0)] if "ssl-real" in s.settings else []) + [(st, k) for st in SSL_SETTINGS[1:] if st in s.settings for k in s.scales]
    short = B.check_coverage(cfg, y_real, y_syn, [k for _, k in plan], echo)
    n_cls = len(L.label_space(cfg.label_space))
    runs = []
    for seed in cfg.seeds:
        real_idx = B.per_class_subset(y_real, cfg.real_per_class, stream_rng(seed, "benchmark.real"))
        for setting, scale in plan:
            syn_idx = B.per_class_subset(y_syn, int(round(scale * cfg.real_per_class)), stream_rng(seed, "benchmark.synthetic")) if scale else []
            x = pretraining_set(setting, x_real[real_idx], x_syn[syn_idx])
            t = time.time()
            enc, losses = pretrain(x, s, seed)
            f_train = embed(enc, x_real[real_idx])
            predict = linear_probe(f_train, y_real[real_idx], n_cls, s.probe_iters, s.probe_weight_decay, seed)
            res = {}
            for prefix, (xt, yt) in tests.items():
                res.update({prefix + k: v for k, v in B.scores(yt, predict(embed(enc, xt)), n_cls).items()})
            run = {"setting": setting, "scale": scale, "seed": seed, "train_images": int(len(x)), "synthetic_images": int(len(syn_idx)),
                   "probe_images": int(len(real_idx)), **res, "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:])),
                   "seconds": round(time.time() - t, 2)}
            runs.append(run)
            extra = f"  | test2 acc {res['test2_accuracy']:.3f}" if "test2_accuracy" in res else ""
            echo(f"  seed {seed} {setting:<19} x{scale:<4g} {len(x):>5} imgs  loss {run['loss_first']:.2f}->{run['loss_last']:.2f}"
                 f"  acc {res['accuracy']:.3f}  uar {res['uar']:.3f}{extra}  ({run['seconds']:.1f} s)")
    counts = {"real_train": int(len(y_real)), "synthetic": int(len(y_syn)), "real_test": int(len(tests[""][1]))}
    if "test2_" in tests:
        counts["real_test_2"] = int(len(tests["test2_"][1]))
    result = {"config": cfg.model_dump(), "paradigm": "simclr+linear-probe", "runs": runs, "summary": B.summarize(runs),
              "seconds": round(time.time() - t0, 1), "counts": counts, "short": short}
    out = Path(cfg.output or cfg.synthetic)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ssl.json", result)
    B.plot_downstream(result, out / "ssl.png")
    return result
