"""FERAnno's dual-branch encoder (paper 4.4, Fig. 4), as top-level torch modules.

A residual conv block per branch (features, attention maps), bi-directional cross-attention
between the branches at each scale, 1x1 convs carrying the fused state from one scale to
the next, then concatenation and a linear head. Imported only when an encoder is built or
loaded (this module imports torch).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synfer.engine.checkpoints import load_state
from synfer_plugins.feranno.capture import align_capture

ORDERS = ("coarse-to-fine", "fine-to-coarse")


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

    def __init__(self, c, heads: int):
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
    """The dual-branch encoder of Fig. 4 for the given capture shapes (see `build_encoder`)."""

    def __init__(self, feat_channels: list[int], feat_res: list[int], tokens: int, num_classes: int, dim: int = 64, heads: int = 4,
                 pool: int = 1, max_res: int = 16, order: str = "coarse-to-fine", attention: str = "scale"):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"FERAnno encoder order {order!r}: expected 'coarse-to-fine' or 'fine-to-coarse'")
        self.order, self.pool, self.attention_read = order, pool, attention
        self.res = list(feat_res)
        self.feat_in = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in feat_channels)
        self.att_in = nn.ModuleList(nn.Conv2d(tokens, dim, 1) for _ in feat_channels)
        self.feat_block = nn.ModuleList(ResBlock(dim) for _ in feat_channels)
        self.att_block = nn.ModuleList(ResBlock(dim) for _ in feat_channels)
        self.cross = nn.ModuleList(BiCrossAttention(dim, heads) for _ in feat_channels)
        # 1x1 convs carrying the fused state of the previous (coarser) scale into the next
        self.carry_f = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in feat_channels[1:])
        self.carry_a = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in feat_channels[1:])
        width = 2 * dim * len(feat_channels) * pool * pool
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Dropout(0.1), nn.Linear(width, num_classes))
        self.max_cross_res = max_res

    def forward(self, features, attention):
        """`features` low->high res and `attention` either a capture's {res: maps} or, already aligned by
        `capture.align_capture` (e.g. from the feature cache), one map per scale at that scale's side."""
        if isinstance(attention, dict):
            features, attention = align_capture(features, attention, self.max_cross_res, self.attention_read)
        pooled, f_prev, a_prev = [], None, None
        steps = list(enumerate(features))
        for i, feat in (steps if self.order == "coarse-to-fine" else steps[::-1]):
            r = min(feat.shape[-1], self.max_cross_res)
            f = self.feat_in[i](F.adaptive_avg_pool2d(feat, r) if feat.shape[-1] != r else feat)
            a = self.att_in[i](attention[i])
            if f_prev is not None:
                j = i - 1 if self.order == "coarse-to-fine" else i  # carry_*[j] joins scales j and j + 1
                f = f + self.carry_f[j](_resize(f_prev, r))
                a = a + self.carry_a[j](_resize(a_prev, r))
            f, a = self.cross[i](self.feat_block[i](f), self.att_block[i](a))
            f_prev, a_prev = f, a
            pooled += [F.adaptive_avg_pool2d(f, self.pool).flatten(1), F.adaptive_avg_pool2d(a, self.pool).flatten(1)]
        return self.head(torch.cat(pooled, dim=1))


def build_encoder(feat_channels: list[int], feat_res: list[int], tokens: int, num_classes: int, dim: int = 64, heads: int = 4,
                  pool: int = 1, max_res: int = 16, order: str = "coarse-to-fine", attention: str = "scale") -> FERAnnoEncoder:
    """The dual-branch encoder of Fig. 4 for the given capture shapes.

    `order` is the direction the 1x1 convs carry the fused state between scales: `coarse-to-fine`
    (each scale sees the coarser ones) or `fine-to-coarse` (a pyramid like a CNN's: the coarsest
    scale sees every finer one, through a residual block and a cross-attention per scale).

    Each scale's fused maps are average-pooled to a `pool` x `pool` grid before the head: 1 is
    a global average; 4 keeps where on the face a feature fires (mouth corners vs brows).
    Scales finer than `max_res` are average-pooled to it first (the cross-attention costs (h*w)^2).
    `attention` is how each scale picks its attention maps (see `capture.align_capture`)."""
    return FERAnnoEncoder(feat_channels, feat_res, tokens, num_classes, dim, heads, pool, max_res, order, attention)


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
                        max_res=cfg.get("max_res", 16), order=cfg.get("order", "coarse-to-fine"),
                        attention=cfg.get("attention", "nearest"))  # encoders trained before `attention` existed read "nearest"
    load_state(enc, folder / "model.safetensors", folder / "model.safetensors",
               "FERAnno is tied to the UNet it was trained on: retrain it with 'synfer train calibrator --model GENERATOR'.")
    return enc.to(device).eval(), cfg

