"""Training FERAnno's encoder on FEText with the generator's UNet frozen (paper 4.4), and its held-out check.

The UNet is frozen and the noise of Eq. 1 is fixed per image, so each image's capture is
extracted once into a cache and the encoder trains on it for many epochs (see `train_feranno`).
Imported only by `synfer train calibrator` and tests (this module imports torch).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.model import BaseModel

from synfer.arrays import load_arrays
from synfer_plugins.feranno.capture import condition_inputs, extract
from synfer_plugins.feranno.encoder import build_encoder, save_encoder
from synfer_plugins.feranno.stage import FERAnnoConfig


def model_key(model_path, data_path) -> str:
    """Identifies (generator weights, data) pairs, e.g. for feature caches: the folders' paths and the
    size and modification time of their weight and metadata files, so retraining the UNet or the AU
    adapter in place (or rebuilding the data) never reuses features of the old weights."""
    stamp = []
    for root in (Path(model_path), Path(data_path)):
        stamp.append(str(root.resolve()))
        for folder, dirs, names in os.walk(root):  # one walk per folder; training runs' work/ (this cache) is skipped
            dirs[:] = sorted(d for d in dirs if d != "work")
            for name in sorted(n for n in names if n.endswith((".safetensors", ".bin", ".jsonl"))):
                st = os.stat(os.path.join(folder, name))
                stamp.append(f"{os.path.relpath(os.path.join(folder, name), root)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(stamp).encode()).hexdigest()[:12]


# ------------------------------------------------------------------ training


def captures(sd, x, aus, captions, cfg, seeds, batch_size: int, num_scales: int = 4, progress: bool = False):
    """Per batch of a uint8 image array (N,H,W,3): the UNet capture under `cfg`'s condition."""
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(x), batch_size), desc="FERAnno features", disable=not progress):
        imgs = torch.from_numpy(x[i:i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        p, a = condition_inputs(cfg, captions[i:i + batch_size], torch.from_numpy(aus[i:i + batch_size]), len(imgs))
        yield extract(sd, imgs, p, a.to(sd.device, sd.dtype), seeds[i:i + batch_size], cfg.t, num_scales)


def extract_dataset(sd, x, aus, captions, cfg, seeds, batch_size: int = 128, max_res: int = 16, progress: bool = True):
    """Features and attention maps of a whole image array, pooled to at most `max_res` (what the
    encoder sees) and stored in fp16: (list of (N,C,r,r), {res: (N,T,res,res)})."""

    feats, att = None, None
    for f, at in captures(sd, x, aus, captions, cfg, seeds, batch_size, progress=progress):
        f = [v if v.shape[-1] <= max_res else F.adaptive_avg_pool2d(v, max_res) for v in f]
        if feats is None:
            feats, att = [[] for _ in f], {k: [] for k in at}
        for j, v in enumerate(f):
            feats[j].append(v.half().cpu())
        for k, v in at.items():
            att[k].append(v.half().cpu())
    return [torch.cat(v) for v in feats], {k: torch.cat(v) for k, v in att.items()}


def cached_features(cache_dir, key: str, compute):
    """`compute()` once per key, kept as a safetensors file in `cache_dir` (None: not cached)."""
    if cache_dir is None:
        return compute()
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / f"features-{key}.safetensors"
    if path.exists():
        d = load_file(str(path))
        feats = [d[k] for k in sorted((k for k in d if k.startswith("f")), key=lambda k: int(k[1:]))]
        return feats, {int(k[1:]): d[k] for k in d if k.startswith("a")}
    feats, att = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({**{f"f{i}": v.contiguous() for i, v in enumerate(feats)}, **{f"a{k}": v.contiguous() for k, v in att.items()}}, str(tmp))
    tmp.replace(path)
    return feats, att


def shifted_views(x, views: int, seed: int = 0, max_shift: int = 2):
    """(N,H,W,3) uint8 -> (views*N,H,W,3): view 0 is `x`, each later view moves every image by its own
    seeded (dx, dy) in [-max_shift, max_shift] pixels, edges replicated. No flips: contempt is one-sided."""

    out = [x]
    pad = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    for v in range(1, views):
        shifts = np.random.default_rng([seed, v]).integers(0, 2 * max_shift + 1, size=(len(x), 2))
        out.append(np.stack([pad[i, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts)]))
    return np.concatenate(out)


class FERAnnoTrainModel(BaseModel):
    """Cross-entropy (label smoothing 0.05, optional mixup) of the encoder on cached captures, by row index."""

    def __init__(self, enc, feats: list, att: dict, targets, mixup: float = 0.0):
        super().__init__()
        self.enc, self.mixup = enc, mixup
        self.feats, self.att, self.targets = feats, att, targets  # plain attributes: not parameters, not in checkpoints

    def forward(self, index, mode="loss"):
        device = self.targets.device
        index = index.to(device)
        f = [v[index].float() for v in self.feats]
        a = {k: v[index].float() for k, v in self.att.items()}
        y = self.targets[index]
        if not self.mixup:
            return {"loss": F.cross_entropy(self.enc(f, a), y, label_smoothing=0.05)}
        lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())  # seeded by the runner
        perm = torch.randperm(len(index)).to(device)
        logits = self.enc([lam * v + (1 - lam) * v[perm] for v in f], {k: lam * v + (1 - lam) * v[perm] for k, v in a.items()})
        ce = lambda t: F.cross_entropy(logits, t, label_smoothing=0.05)  # noqa: E731
        return {"loss": lam * ce(y) + (1 - lam) * ce(y[perm])}


class Indices(torch.utils.data.Dataset):
    """Row indices as the dataset: the captures themselves stay in FERAnnoTrainModel."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": i}


def train_feranno(data, model, out, test=None, iters: int = 800, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                  label_space: str = "affectnet8", dim: int = 64, condition: str = "generic", limit: int | None = None,
                  resume: bool = False, threads: int | None = None, pool: int = 4, max_res: int = 8, cache: bool = True,
                  views: int = 1, mixup: float = 0.0, device: str | None = None, t: int = 1, order: str = "fine-to-coarse"):
    """Train the dual-branch encoder on FEText with the generator's UNet frozen (run on mmengine's Runner).

    The UNet is frozen and the noise of Eq. 1 is fixed per image, so each image's capture is
    extracted once (OUT/work/features-<model,data,condition,t>.safetensors, fp16) and the
    encoder trains on it for many epochs: 18x fewer UNet passes than extracting per step.
    Cached features rule out on-the-fly augmentation, so `views` > 1 extracts each image
    again shifted by a few pixels with its own noise (`shifted_views`): the encoder then
    cannot memorise one exact capture per face. `mixup` > 0 mixes each batch with a shuffled
    copy of itself (captures and labels, weight ~ Beta(mixup, mixup); Zhang et al. 2018).
    `device` (default: cuda when there is one) runs the UNet pass and the encoder; the cached
    captures then live on it too (a few GB at max_res 32 for 20k faces).
    """
    from synfer import labels as L
    from synfer.plugins import get_registry
    from synfer.training import run_training

    if threads:
        torch.set_num_threads(threads)
    gen_cls = get_registry().get("generator", "synfer:sd")  # the built-in, even beside a third party's "sd"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = gen_cls(gen_cls.Config(model=str(model), device=device))
    sd = gen.load()
    for m in (sd.unet, sd.text_encoder):
        m.requires_grad_(False)
    x, y, aus, rows = load_arrays(data, label_space, size=gen.size, limit=limit)
    cfg = FERAnnoConfig(condition=condition, t=t)
    captions = [r.get("caption", "") for r in rows] * views
    x, y, aus = shifted_views(x, views, seed), np.tile(y, views), np.tile(aus, (views, 1))
    key = f"{model_key(model, data)}-{condition}-t{cfg.t}-r{max_res}-n{len(y)}-s{seed}" + (f"-v{views}" if views > 1 else "")
    feats, att = cached_features(Path(out) / "work" if cache else None, key, lambda: extract_dataset(
        sd, x, aus, captions, cfg, [i + seed * 1_000_003 for i in range(len(y))], max_res=max_res))
    enc_cfg = {"feat_channels": [f.shape[1] for f in feats], "feat_res": [f.shape[-1] for f in feats],
               "tokens": next(iter(att.values())).shape[1], "num_classes": len(L.label_space(label_space)), "dim": dim, "pool": pool,
               "max_res": max_res, "views": views, "mixup": mixup, "order": order, "num_scales": len(feats), "label_space": label_space, "condition": condition, "t": cfg.t, "generator": str(model),
               "trained_with": {"data": str(data), "train_images": int(len(y)), "iters": iters, "batch_size": batch_size, "lr": lr, "seed": seed,
                                "device": device}}
    enc = build_encoder(enc_cfg["feat_channels"], enc_cfg["feat_res"], enc_cfg["tokens"], enc_cfg["num_classes"], dim, pool=pool,
                        max_res=max_res, order=order)
    feats, att = [v.to(device) for v in feats], {k: v.to(device) for k, v in att.items()}  # the Runner moves the encoder there too
    targets = torch.from_numpy(y).long().to(device)
    result = run_training(FERAnnoTrainModel(enc, feats, att, targets, mixup), Indices(len(y)), work_dir=Path(out) / "work",
                          max_iters=iters, batch_size=batch_size, lr=lr, weight_decay=1e-4, warmup_iters=max(1, iters // 20), seed=seed, resume=resume, log_interval=50,
                          checkpoint_interval=max(50, iters // 4), keep_checkpoints=1, threads=threads, name="feranno")
    enc.eval()
    metrics = {}
    if test is not None:
        metrics = evaluate_feranno(sd, enc, enc_cfg, test, label_space, gen.size, cfg)
        enc_cfg["heldout"] = metrics
    save_encoder(enc, out, enc_cfg)
    return enc, result.losses, metrics


def evaluate_feranno(sd, enc, enc_cfg, test, label_space, size, cfg, batch_size: int = 64) -> dict:
    x, y, aus, rows = load_arrays(test, label_space, size=size)
    preds = []
    for f, at in captures(sd, x, aus, [r.get("caption", "") for r in rows], cfg, list(range(len(y))), batch_size, enc_cfg["num_scales"]):
        with torch.no_grad():
            preds.append(enc([v.float() for v in f], {k: v.float() for k, v in at.items()}).argmax(1).cpu().numpy())
    pred = np.concatenate(preds)
    from synfer.scoring import classification_scores

    return {**classification_scores(y, pred), "n": int(len(y))}
