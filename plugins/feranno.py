"""FERAnno: a label calibrator reading the generator's own UNet (paper 4.4, Fig. 4).

The image is noised to t=1 (Eq. 1), the UNet runs once with the sample's text and AU
conditions, and two things are captured: decoder feature maps (mid block and every up
block: four resolutions in SD 1.5) and every cross-attention probability map, averaged
over heads and over the layers of each resolution. A dual-branch encoder fuses them:
a residual conv block per branch, bi-directional cross-attention between the branches at
each scale, 1x1 convs carrying the fused state from one scale to the next, then
concatenation and a linear head. Maps are captured by wrapping attention processors
(never by editing diffusers code) and freed after each batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from synfer.checkpoints import load_state
from synfer import hookimpl
from synfer.stages import Calibrator, StageConfig, missing_path

MODELS = Path(__file__).parent / "models"


# ------------------------------------------------------------------ capture


class AttentionStore:
    """Collects cross-attention probabilities (B, H*W, tokens), heads averaged, per layer."""

    def __init__(self):
        self.maps: list = []
        self.enabled = False

    def reset(self):
        self.maps = []


def capture_processor(inner, store: AttentionStore):
    """Wraps an attention processor: on cross-attention it also computes the text
    attention probabilities (the SDPA processors never materialise them) and stores them."""

    class CrossAttentionCapture:
        def __init__(self):
            self.inner = inner

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
            if store.enabled and encoder_hidden_states is not None:
                text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
                h = hidden_states
                if h.ndim == 4:
                    h = h.flatten(2).transpose(1, 2)
                if attn.norm_cross:
                    text = attn.norm_encoder_hidden_states(text)
                q = attn.head_to_batch_dim(attn.to_q(h))
                k = attn.head_to_batch_dim(attn.to_k(text))
                probs = attn.get_attention_scores(q, k, None)  # (B*heads, HW, T)
                store.maps.append(probs.view(h.shape[0], attn.heads, *probs.shape[1:]).mean(1))
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    return CrossAttentionCapture()


class UNetCapture:
    """Context manager installing the capture on a UNet: decoder features + cross-attention maps."""

    def __init__(self, unet):
        self.unet = unet
        self.store = AttentionStore()
        self.features: list = []
        self._hooks = []
        self._procs = None

    def __enter__(self):
        self._procs = dict(self.unet.attn_processors)
        self.unet.set_attn_processor({k: capture_processor(p, self.store) if k.endswith("attn2.processor") else p
                                      for k, p in self._procs.items()})
        blocks = [self.unet.mid_block] + list(self.unet.up_blocks)
        for b in blocks:
            self._hooks.append(b.register_forward_hook(lambda m, i, o: self.features.append(o[0] if isinstance(o, tuple) else o)))
        self.store.enabled = True
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self.unet.set_attn_processor(self._procs)
        self.store.enabled = False

    def collect(self, num_scales: int = 4):
        """-> (features: list of (B,C,h,w) low->high res, attention: {res: (B,T,res,res)}); frees the store."""
        import torch

        feats = {}
        for f in self.features:  # the last map at each resolution is the most refined
            feats[f.shape[-1]] = f
        res_sorted = sorted(feats)
        picked = res_sorted[-num_scales:] if len(res_sorted) >= num_scales else res_sorted
        features = [feats[r] for r in picked]
        groups: dict[int, list] = {}
        for m in self.store.maps:
            r = int(round(m.shape[1] ** 0.5))
            groups.setdefault(r, []).append(m.transpose(1, 2).reshape(m.shape[0], m.shape[2], r, r))
        attention = {r: torch.stack(v).mean(0) for r, v in sorted(groups.items())}
        self.features, self.store.maps = [], []
        return features, attention


# ------------------------------------------------------------------ encoder


def build_encoder(feat_channels: list[int], feat_res: list[int], tokens: int, num_classes: int, dim: int = 64, heads: int = 4,
                  pool: int = 1, max_res: int = 16, order: str = "coarse-to-fine"):
    """The dual-branch encoder of Fig. 4 for the given capture shapes.

    `order` is the direction the 1x1 convs carry the fused state between scales: `coarse-to-fine`
    (each scale sees the coarser ones) or `fine-to-coarse` (a pyramid like a CNN's: the coarsest
    scale sees every finer one, through a residual block and a cross-attention per scale).

    Each scale's fused maps are average-pooled to a `pool` x `pool` grid before the head: 1 is
    a global average; 4 keeps where on the face a feature fires (mouth corners vs brows).
    Scales finer than `max_res` are average-pooled to it first (the cross-attention costs (h*w)^2)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if order not in ("coarse-to-fine", "fine-to-coarse"):
        raise ValueError(f"FERAnno encoder order {order!r}: expected 'coarse-to-fine' or 'fine-to-coarse'")

    def _resize(x, r):
        return F.interpolate(x, size=(r, r), mode="nearest") if x.shape[-1] <= r else F.adaptive_avg_pool2d(x, r)

    class ResBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                      nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

        def forward(self, x):
            return x + self.body(x)

    class BiCrossAttention(nn.Module):
        """Features attend to attention maps and attention maps attend to features."""

        def __init__(self, c):
            super().__init__()
            self.f2a = nn.MultiheadAttention(c, heads, batch_first=True)
            self.a2f = nn.MultiheadAttention(c, heads, batch_first=True)
            self.nf, self.na = nn.LayerNorm(c), nn.LayerNorm(c)

        def forward(self, f, a):
            b, c, h, w = f.shape
            ft, at = self.nf(f.flatten(2).transpose(1, 2)), self.na(a.flatten(2).transpose(1, 2))
            f2 = ft + self.f2a(ft, at, at, need_weights=False)[0]
            a2 = at + self.a2f(at, ft, ft, need_weights=False)[0]
            return f2.transpose(1, 2).reshape(b, c, h, w), a2.transpose(1, 2).reshape(b, c, h, w)

    class FERAnnoEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.res = list(feat_res)
            self.feat_in = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in feat_channels)
            self.att_in = nn.ModuleList(nn.Conv2d(tokens, dim, 1) for _ in feat_channels)
            self.feat_block = nn.ModuleList(ResBlock(dim) for _ in feat_channels)
            self.att_block = nn.ModuleList(ResBlock(dim) for _ in feat_channels)
            self.cross = nn.ModuleList(BiCrossAttention(dim) for _ in feat_channels)
            # 1x1 convs carrying the fused state of the previous (coarser) scale into the next
            self.carry_f = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in feat_channels[1:])
            self.carry_a = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in feat_channels[1:])
            width = 2 * dim * len(feat_channels) * pool * pool
            self.head = nn.Sequential(nn.LayerNorm(width), nn.Dropout(0.1), nn.Linear(width, num_classes))
            self.max_cross_res = max_res

        def _att_for(self, attention: dict, r: int):
            """The attention maps nearest to resolution r, resized to r."""
            src = min(attention, key=lambda k: (abs(k - r), -k))
            a = attention[src]
            return a if src == r else F.interpolate(a, size=(r, r), mode="bilinear", align_corners=False)

        def forward(self, features, attention):
            pooled, f_prev, a_prev = [], None, None
            steps = list(enumerate(features))
            for i, feat in (steps if order == "coarse-to-fine" else steps[::-1]):
                r = min(feat.shape[-1], self.max_cross_res)
                f = self.feat_in[i](F.adaptive_avg_pool2d(feat, r) if feat.shape[-1] != r else feat)
                a = self.att_in[i](self._att_for(attention, r))
                if f_prev is not None:
                    j = i - 1 if order == "coarse-to-fine" else i  # carry_*[j] joins scales j and j + 1
                    f = f + self.carry_f[j](_resize(f_prev, r))
                    a = a + self.carry_a[j](_resize(a_prev, r))
                f, a = self.cross[i](self.feat_block[i](f), self.att_block[i](a))
                f_prev, a_prev = f, a
                pooled += [F.adaptive_avg_pool2d(f, pool).flatten(1), F.adaptive_avg_pool2d(a, pool).flatten(1)]
            return self.head(torch.cat(pooled, dim=1))

    return FERAnnoEncoder()


# ------------------------------------------------------------------ extraction


def noise_to_t1(sd, images, seeds, t: int = 1):
    """Eq. 1 at t (paper: t=1): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, eps from each sample's seed."""
    import torch

    x0 = sd.encode_image(images.to(device=sd.device, dtype=sd.dtype))
    eps = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(x0)
    ts = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
    return sd.scheduler.add_noise(x0, eps, ts), ts


def extract(sd, images, prompts, aus, seeds, t: int = 1, num_scales: int = 4):
    """One UNet pass under capture -> (features low->high res, {res: attention maps}). No gradients."""
    import torch

    with torch.no_grad(), UNetCapture(sd.unet) as cap:
        x_t, ts = noise_to_t1(sd, images, seeds, t)
        text = sd.encode_text(prompts)
        sd.predict_noise(x_t, ts, text, aus if sd.au_adapter is not None else None)
        return cap.collect(num_scales)


def _condition(cfg, prompts, aus, n):
    """The conditions FERAnno reads with. `generic` (default) uses one expression-free prompt and
    zero AUs, so the calibrator judges the pixels and cannot echo the preassigned label that the
    sample's own prompt and AU vector were drawn from; `sample` uses them (as in the paper)."""
    import torch

    from synfer import labels as L

    if cfg.condition == "sample":
        return list(prompts), aus
    return [cfg.generic_prompt] * n, torch.zeros(n, len(L.AU_KEYS))


class FERAnnoConfig(StageConfig):
    weights: str | None = None  # FERAnno folder (encoder + config); None: the shipped `feranno`
    device: str = "cpu"
    t: int | None = None  # Eq. 1 timestep the image is noised to before the UNet pass; None: the one it was trained at
    condition: str | None = None  # generic | sample (see _condition); None: the one it was trained with
    generic_prompt: str = "a photo of a person"
    batch_size: int = 32


class FERAnno(Calibrator):
    """Diffusion-feature label calibrator (paper 4.4)."""

    name = "feranno"
    label_space = "affectnet8"
    Config = FERAnnoConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.gen = None
        self._enc = None
        self._cfg = None

    @classmethod
    def problems(cls, config):
        return missing_path(config, "weights", "a FERAnno folder (config.json + model.safetensors)",
                            "Train one with 'synfer train calibrator --data FETEXT --model GENERATOR --out FOLDER'.")

    def bind(self, generator) -> None:
        self.gen = generator

    @property
    def encoder(self):
        if self._enc is None:
            self._enc, self._cfg = load_encoder(self.config.weights or MODELS / "feranno", self.config.device)
            self.label_space = self._cfg["label_space"]
        return self._enc

    def _read_as(self):
        """The stage config with t and condition filled in from the trained encoder where the recipe left them out:
        an encoder only reads captures taken the way it was trained."""
        _ = self.encoder
        return self.config.model_copy(update={"t": self.config.t if self.config.t is not None else self._cfg.get("t", 1),
                                              "condition": self.config.condition or self._cfg.get("condition", "generic")})

    def predict_tensors(self, images, prompts, aus, seeds):
        """images (N,3,H,W) in [-1,1] at the generator's size -> probabilities (N, classes)."""
        import torch

        if self.gen is None:
            raise RuntimeError("FERAnno needs the generator whose UNet it reads: call bind(generator) first "
                               "(synfer run does this from the recipe's generator block)")
        sd = self.gen.load()
        enc, cfg = self.encoder, self._read_as()
        out = []
        for i in range(0, images.shape[0], cfg.batch_size):
            sl = slice(i, i + cfg.batch_size)
            p, a = _condition(cfg, prompts[sl], aus[sl], images[sl].shape[0])
            feats, att = extract(sd, images[sl], p, a.to(sd.device, sd.dtype), seeds[sl], cfg.t, self._cfg["num_scales"])
            with torch.no_grad():
                out.append(torch.softmax(enc([f.float() for f in feats], {k: v.float() for k, v in att.items()}), -1).cpu())
            del feats, att  # the captured maps are freed after each batch
        return torch.cat(out).numpy()

    def predict(self, samples):
        import numpy as np
        import torch

        from synfer import labels as L

        size = self.gen.size
        arr = np.stack([np.asarray(s.image.convert("RGB").resize((size, size)), dtype=np.float32) for s in samples])
        images = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
        aus = torch.from_numpy(np.stack([L.au_vector(s.request.aus) for s in samples]))
        return self.predict_tensors(images, [s.request.prompt for s in samples], aus, [s.request.seed for s in samples])

    @staticmethod
    def train(*args, **kwargs):
        return train_feranno(*args, **kwargs)


def save_encoder(enc, folder, config: dict):
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def load_encoder(folder, device="cpu"):

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no trained FERAnno (config.json + model.safetensors). "
                                f"Train one with 'synfer train calibrator --data FETEXT --model GENERATOR --out {folder}'.")
    cfg = json.loads((folder / "config.json").read_text())
    enc = build_encoder(cfg["feat_channels"], cfg["feat_res"], cfg["tokens"], cfg["num_classes"], cfg["dim"], pool=cfg.get("pool", 1),
                        max_res=cfg.get("max_res", 16), order=cfg.get("order", "coarse-to-fine"))
    load_state(enc, folder / "model.safetensors", folder / "model.safetensors",
               "FERAnno is tied to the UNet it was trained on: retrain it with 'synfer train calibrator --model GENERATOR'.")
    return enc.to(device).eval(), cfg


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
    import torch
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(x), batch_size), desc="FERAnno features", disable=not progress):
        imgs = torch.from_numpy(x[i:i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        p, a = _condition(cfg, captions[i:i + batch_size], torch.from_numpy(aus[i:i + batch_size]), len(imgs))
        yield extract(sd, imgs, p, a.to(sd.device, sd.dtype), seeds[i:i + batch_size], cfg.t, num_scales)


def extract_dataset(sd, x, aus, captions, cfg, seeds, batch_size: int = 128, max_res: int = 16, progress: bool = True):
    """Features and attention maps of a whole image array, pooled to at most `max_res` (what the
    encoder sees) and stored in fp16: (list of (N,C,r,r), {res: (N,T,res,res)})."""
    import torch
    import torch.nn.functional as F

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
    import numpy as np

    out = [x]
    pad = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    for v in range(1, views):
        shifts = np.random.default_rng([seed, v]).integers(0, 2 * max_shift + 1, size=(len(x), 2))
        out.append(np.stack([pad[i, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts)]))
    return np.concatenate(out)


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
    import numpy as np
    import torch
    import torch.nn.functional as F
    from mmengine.model import BaseModel

    from synfer import labels as L
    from synfer.plugins import get_registry
    from synfer.training import run_training

    if threads:
        torch.set_num_threads(threads)
    gen_cls = get_registry().get("generator", "sd")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = gen_cls(gen_cls.Config(model=str(model), device=device))
    sd = gen.load()
    for m in (sd.unet, sd.text_encoder):
        m.requires_grad_(False)
    tiny = get_registry().get("guidance_classifier", "tiny-cnn")
    load_arrays = __import__(tiny.__module__, fromlist=["load_arrays"]).load_arrays
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

    class FERAnnoTrainModel(BaseModel):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, index, mode="loss"):
            index = index.to(device)
            f = [v[index].float() for v in feats]
            a = {k: v[index].float() for k, v in att.items()}
            if not mixup:
                return {"loss": F.cross_entropy(self.enc(f, a), targets[index], label_smoothing=0.05)}
            lam = float(torch.distributions.Beta(mixup, mixup).sample())  # seeded by the runner
            perm = torch.randperm(len(index)).to(device)
            logits = self.enc([lam * v + (1 - lam) * v[perm] for v in f], {k: lam * v + (1 - lam) * v[perm] for k, v in a.items()})
            ce = lambda t: F.cross_entropy(logits, t, label_smoothing=0.05)  # noqa: E731
            return {"loss": lam * ce(targets[index]) + (1 - lam) * ce(targets[index][perm])}

    class Indices(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return {"index": i}

    result = run_training(FERAnnoTrainModel(), Indices(), work_dir=Path(out) / "work", max_iters=iters, batch_size=batch_size, lr=lr,
                          weight_decay=1e-4, warmup_iters=max(1, iters // 20), seed=seed, resume=resume, log_interval=50,
                          checkpoint_interval=max(50, iters // 4), keep_checkpoints=1, threads=threads, name="feranno")
    enc.eval()
    metrics = {}
    if test is not None:
        metrics = evaluate_feranno(sd, enc, enc_cfg, test, label_space, gen.size, cfg)
        enc_cfg["heldout"] = metrics
    save_encoder(enc, out, enc_cfg)
    return enc, result.losses, metrics


def evaluate_feranno(sd, enc, enc_cfg, test, label_space, size, cfg, batch_size: int = 64) -> dict:
    import numpy as np
    import torch

    from synfer.plugins import get_registry

    tiny = get_registry().get("guidance_classifier", "tiny-cnn")
    load_arrays = __import__(tiny.__module__, fromlist=["load_arrays"]).load_arrays
    x, y, aus, rows = load_arrays(test, label_space, size=size)
    preds = []
    for f, at in captures(sd, x, aus, [r.get("caption", "") for r in rows], cfg, list(range(len(y))), batch_size, enc_cfg["num_scales"]):
        with torch.no_grad():
            preds.append(enc([v.float() for v in f], {k: v.float() for k, v in at.items()}).argmax(1).cpu().numpy())
    pred = np.concatenate(preds)
    recalls = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    return {"accuracy": float((pred == y).mean()), "uar": float(np.mean(recalls)), "n": int(len(y))}


@hookimpl
def register_stages(register):
    register(FERAnno)
