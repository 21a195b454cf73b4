"""Training FERAnno's encoder on FEText with the generator's UNet frozen (paper 4.4), and its held-out check.

The UNet is frozen and the noise of Eq. 1 is fixed per image, so each image's capture is
extracted once into a cache and the encoder trains on it for many epochs (see `train_feranno`).
Imported only by `synfer train calibrator` and tests (this module imports torch).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.model import BaseModel

from synfer.engine.arrays import load_arrays
from synfer.engine.stamps import folder_stamp, stamp_key
from synfer_plugins.feranno.capture import align_capture, condition_inputs, default_max_res, extract
from synfer_plugins.feranno.encoder import build_encoder, save_encoder
from synfer_plugins.feranno.stage import FERAnnoConfig


def model_key(model_path, data_path) -> str:
    """Identifies (generator weights, data) pairs, e.g. for feature caches: the folders' paths and the
    size and modification time of their weight and metadata files, so retraining the UNet or the AU
    adapter in place (or rebuilding the data) never reuses features of the old weights."""
    suffixes = (".safetensors", ".bin", ".jsonl")
    return stamp_key(folder_stamp(model_path, suffixes) + folder_stamp(data_path, suffixes))


# ------------------------------------------------------------------ training


def captures(sd, x, aus, captions, cfg, seeds, batch_size: int, num_scales: int | None = None, progress: bool = False):
    """Per batch of a uint8 image array (N,H,W,3): the UNet capture under `cfg`'s condition."""
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(x), batch_size), desc="FERAnno features", disable=not progress):
        imgs = torch.from_numpy(x[i:i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        p, a = condition_inputs(cfg, captions[i:i + batch_size], torch.from_numpy(aus[i:i + batch_size]), len(imgs))
        yield extract(sd, imgs, p, a, seeds[i:i + batch_size], cfg.t, num_scales)


def extract_dataset(sd, x, aus, captions, cfg, seeds, max_res: int, attention: str = "scale", folder=None, batch_size: int = 128,
                    num_scales: int | None = None, progress: bool = True):
    """What the encoder reads of every image (`capture.align_capture`: per scale, features and one attention
    map at min(side, max_res)), as float16 arrays (features [(N,C,r,r)], attention [(N,T,r,r)]).
    With `folder` they are .npy files filled batch by batch and returned memory-mapped: neither RAM nor
    the device ever holds the whole set."""
    arrays, n = None, len(x)
    for start, (f, at) in zip(range(0, n, batch_size), captures(sd, x, aus, captions, cfg, seeds, batch_size, num_scales, progress)):
        f, a = align_capture(f, at, max_res, attention)
        if arrays is None:
            shapes = [(f"f{j}", v.shape[1:]) for j, v in enumerate(f)] + [(f"a{j}", v.shape[1:]) for j, v in enumerate(a)]
            arrays = [np.lib.format.open_memmap(str(Path(folder) / f"{name}.npy"), mode="w+", dtype=np.float16, shape=(n, *shape))
                      if folder is not None else np.empty((n, *shape), np.float16) for name, shape in shapes]
        for arr, v in zip(arrays, f + a):
            arr[start:start + len(v)] = v.half().cpu().numpy()
    for arr in arrays:
        if isinstance(arr, np.memmap):
            arr.flush()
    k = len(arrays) // 2
    return arrays[:k], arrays[k:]


def cached_features(cache_dir, key: str, compute):
    """`compute(folder)` once per key into `cache_dir`/features-<key>/ (f<i>.npy, a<i>.npy, float16),
    then opened memory-mapped; `compute(None)` (arrays in RAM) when `cache_dir` is None."""
    if cache_dir is None:
        return compute(None)
    import shutil

    folder = Path(cache_dir) / f"features-{key}"
    done = folder / "done.json"
    if not done.exists():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        feats, att = compute(tmp)
        info = {"features": len(feats), "attention": len(att), "images": int(len(feats[0])),
                "bytes_per_image": int(sum(a.nbytes for a in feats + att) // len(feats[0]))}
        del feats, att
        (tmp / "done.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    info = json.loads(done.read_text())
    load = lambda name: np.load(str(folder / f"{name}.npy"), mmap_mode="r")  # noqa: E731
    return [load(f"f{i}") for i in range(info["features"])], [load(f"a{i}") for i in range(info["attention"])]


def cache_bytes_per_image(feats, att) -> int:
    return int(sum(a.nbytes for a in list(feats) + list(att)) // len(feats[0]))


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
    """Cross-entropy (label smoothing 0.05, optional mixup) of the encoder on cached captures, by row index.
    Only each batch's rows are read from the (memory-mapped) arrays and moved to the device."""

    def __init__(self, enc, feats: list, att: list, targets, mixup: float = 0.0):
        super().__init__()
        self.enc, self.mixup = enc, mixup
        self.feats, self.att, self.targets = feats, att, targets  # plain attributes: not parameters, not in checkpoints

    def forward(self, index, mode="loss"):
        device = self.targets.device
        rows = index.cpu().numpy()
        f = [torch.from_numpy(np.ascontiguousarray(v[rows])).to(device).float() for v in self.feats]
        a = [torch.from_numpy(np.ascontiguousarray(v[rows])).to(device).float() for v in self.att]
        y = self.targets[index.to(device)]
        if not self.mixup:
            return {"loss": F.cross_entropy(self.enc(f, a), y, label_smoothing=0.05)}
        lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())  # seeded by the runner
        perm = torch.randperm(len(index)).to(device)
        logits = self.enc([lam * v + (1 - lam) * v[perm] for v in f], [lam * v + (1 - lam) * v[perm] for v in a])
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
                  resume: bool = False, threads: int | None = None, pool: int = 4, max_res: int | None = None, cache: bool = True,
                  views: int = 1, mixup: float = 0.0, device: str | None = None, t: int = 1, order: str = "fine-to-coarse",
                  attention: str = "scale", num_scales: int | None = None, extract_batch_size: int = 128, generator: str = "synfer:sd"):
    """Train the dual-branch encoder on FEText with the generator's UNet frozen (run on mmengine's Runner).

    The encoder reads every decoder scale of the UNet (`num_scales` None: all, 4 in SD 1.5), each with the
    cross-attention maps of its own resolution (`attention="scale"`: all 16 maps of SD 1.5, in 4 groups),
    pooled to at most `max_res` (None: `capture.default_max_res`, 16 or the latent side if smaller).
    The UNet is frozen and the noise of Eq. 1 is fixed per image, so each image's capture is
    extracted once, pooled to what the encoder reads, into OUT/work/calibrator/features-<key>/ (float16
    .npy, memory-mapped; 18x fewer UNet passes than extracting per step). Each step reads its batch's
    rows from there, so neither RAM nor the device ever holds the whole cache.
    Cached features rule out on-the-fly augmentation, so `views` > 1 extracts each image
    again shifted by a few pixels with its own noise (`shifted_views`): the encoder then
    cannot memorise one exact capture per face. `mixup` > 0 mixes each batch with a shuffled
    copy of itself (captures and labels, weight ~ Beta(mixup, mixup); Zhang et al. 2018).
    `device` (default: cuda when there is one) runs the UNet pass and the encoder. `generator` names the generator
    plugin that loads `model` (default: the built-in, even beside a third party's "sd").
    """
    from synfer import labels as L
    from synfer.engine.registry import get_registry
    from synfer.engine.training import kind_work_dir, run_training

    if threads:
        torch.set_num_threads(threads)
    gen_cls = get_registry().get("generator", generator)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = gen_cls(gen_cls.Config(model=str(model), device=device))
    sd = gen.load()  # frozen at load
    x, y, aus, rows = load_arrays(data, label_space, size=gen.size, limit=limit)
    cfg = FERAnnoConfig(condition=condition, t=t)
    captions = [r.get("caption", "") for r in rows] * views
    x, y, aus = shifted_views(x, views, seed), np.tile(y, views), np.tile(aus, (views, 1))
    max_res = max_res or default_max_res([gen.latent_shape()[-1]])
    work = kind_work_dir(out, "calibrator")
    key = (f"{model_key(model, data)}-{condition}-t{cfg.t}-r{max_res}-{attention}-k{num_scales or 'all'}-n{len(y)}-s{seed}"
           + (f"-v{views}" if views > 1 else ""))
    feats, att = cached_features(work if cache else None, key, lambda folder: extract_dataset(
        sd, x, aus, captions, cfg, [i + seed * 1_000_003 for i in range(len(y))], max_res, attention, folder, extract_batch_size,
        num_scales))
    enc_cfg = {"feat_channels": [f.shape[1] for f in feats], "feat_res": [f.shape[-1] for f in feats], "tokens": att[0].shape[1],
               "num_classes": len(L.label_space(label_space)), "dim": dim, "pool": pool, "max_res": max_res, "attention": attention,
               "views": views, "mixup": mixup, "order": order, "num_scales": len(feats), "label_space": label_space,
               "condition": condition, "t": cfg.t, "generator": str(model), "generator_plugin": generator,
               "trained_with": {"data": str(data), "train_images": int(len(y)), "iters": iters, "batch_size": batch_size, "lr": lr,
                                "seed": seed, "device": device, "cache_bytes_per_image": cache_bytes_per_image(feats, att)}}
    enc = build_encoder(enc_cfg["feat_channels"], enc_cfg["feat_res"], enc_cfg["tokens"], enc_cfg["num_classes"], dim, pool=pool,
                        max_res=max_res, order=order, attention=attention)
    targets = torch.from_numpy(y).long().to(device)  # the Runner moves the encoder to the device; captures stay where they are
    result = run_training(FERAnnoTrainModel(enc, feats, att, targets, mixup), Indices(len(y)), work_dir=work, max_iters=iters,
                          batch_size=batch_size, lr=lr, weight_decay=1e-4, warmup_iters=max(1, iters // 20), seed=seed, resume=resume,
                          log_interval=50, checkpoint_interval=max(50, iters // 4), keep_checkpoints=1, threads=threads, name="feranno")
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
    from synfer.engine.scoring import classification_scores

    return {**classification_scores(y, pred), "n": int(len(y))}
