"""What FERAnno reads from the UNet (paper 4.4): decoder feature maps and cross-attention maps.

The image is noised to t (Eq. 1; the paper uses t=1), the UNet runs once with the chosen
conditions, and two things are captured: decoder feature maps (mid block and every up block:
four resolutions in SD 1.5) and every cross-attention probability map, averaged over heads
and over the layers of each resolution. Maps are captured by wrapping attention processors
(never by editing diffusers code) and freed after each batch.

Torch is imported inside functions: the stage module imports this one at registration.
"""
from __future__ import annotations


class AttentionStore:
    """Collects cross-attention probabilities (B, H*W, tokens), heads averaged, per layer."""

    def __init__(self):
        self.maps: list = []
        self.enabled = False

    def reset(self):
        self.maps = []


class CrossAttentionCapture:
    """Wraps an attention processor: on cross-attention it also computes the text attention
    probabilities (the SDPA processors never materialise them) and stores them."""

    def __init__(self, inner, store: AttentionStore):
        self.inner, self.store = inner, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if self.store.enabled and encoder_hidden_states is not None:
            text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
            h = hidden_states
            if h.ndim == 4:
                h = h.flatten(2).transpose(1, 2)
            if attn.norm_cross:
                text = attn.norm_encoder_hidden_states(text)
            q = attn.head_to_batch_dim(attn.to_q(h))
            k = attn.head_to_batch_dim(attn.to_k(text))
            probs = attn.get_attention_scores(q, k, None)  # (B*heads, HW, T)
            self.store.maps.append(probs.view(h.shape[0], attn.heads, *probs.shape[1:]).mean(1))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def capture_processor(inner, store: AttentionStore) -> CrossAttentionCapture:
    return CrossAttentionCapture(inner, store)


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

    def collect(self, num_scales: int | None = None):
        """-> (features: list of (B,C,h,w) low->high res, attention: {res: (B,T,res,res)}); frees the store.
        Features: the `num_scales` finest decoder resolutions (None: all of them, 4 in SD 1.5); attention:
        every cross-attention map, averaged per resolution (SD 1.5: 16 maps in 4 groups, paper 4.4)."""
        import torch

        feats = {}
        for f in self.features:  # the last map at each resolution is the most refined
            feats[f.shape[-1]] = f
        res_sorted = sorted(feats)
        picked = res_sorted[-num_scales:] if num_scales and len(res_sorted) >= num_scales else res_sorted
        features = [feats[r] for r in picked]
        groups: dict[int, list] = {}
        for m in self.store.maps:
            r = int(round(m.shape[1] ** 0.5))
            groups.setdefault(r, []).append(m.transpose(1, 2).reshape(m.shape[0], m.shape[2], r, r))
        attention = {r: torch.stack(v).mean(0) for r, v in sorted(groups.items())}
        self.features, self.store.maps = [], []
        return features, attention


def noise_to_t1(sd, images, seeds, t: int = 1):
    """Eq. 1 at t (paper: t=1): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, eps from each sample's seed."""
    import torch

    x0 = sd.encode_image(images.to(device=sd.device, dtype=sd.dtype))
    eps = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(x0)
    ts = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
    return sd.scheduler.add_noise(x0, eps, ts), ts


def extract(sd, images, prompts, aus, seeds, t: int = 1, num_scales: int | None = None):
    """One UNet pass of a DiffusionBackbone (synfer.stages) under capture -> (features low->high res,
    {res: attention maps}), on the backbone's device. No gradients."""
    import torch

    with torch.no_grad(), UNetCapture(sd.unet) as cap:
        x_t, ts = noise_to_t1(sd, images, seeds, t)
        text = sd.encode_text(list(prompts))
        sd.predict_noise(x_t, ts, text, aus.to(x_t.device, x_t.dtype) if sd.has_au_adapter else None)
        return cap.collect(num_scales)


DEFAULT_MAX_RES = 16  # the encoder's cross-attention costs (h*w)^2: finer scales are pooled to 16x16 (256 positions)
READS = ("scale", "nearest")


def default_max_res(sides) -> int:
    """What the encoder reads by default: every decoder scale at its own side, up to DEFAULT_MAX_RES."""
    return min(DEFAULT_MAX_RES, max(sides))


def align_capture(features, attention: dict, max_res: int, read: str = "scale"):
    """What the encoder reads of a capture: per scale i, features and one attention map, both at
    r_i = min(side_i, max_res). -> (features [(B,C,r_i,r_i)], attention [(B,T,r_i,r_i)]).

    `scale` (the default since SD-scale FERAnno): scale i reads the attention maps of its own
    resolution (nearest one there is), average-pooled to r_i: every cross-attention layer counts.
    `nearest` (encoders whose config.json names no `attention`, e.g. the shipped tiny one): the maps
    nearest to r_i, bilinearly resized; once every scale is pooled to a small max_res this reads
    only the coarsest maps (in SD 1.5 at max_res 8: the mid block's, 1 of 16)."""
    import torch.nn.functional as F

    if read not in READS:
        raise ValueError(f"FERAnno attention read {read!r}: expected one of {', '.join(READS)}")
    feats, atts = [], []
    for f in features:
        side = f.shape[-1]
        r = min(side, max_res)
        feats.append(F.adaptive_avg_pool2d(f, r) if side != r else f)
        want = side if read == "scale" else r
        src = min(attention, key=lambda k: (abs(k - want), -k))
        a = attention[src]
        if src != r:
            a = (F.adaptive_avg_pool2d(a, r) if read == "scale" and src > r else
                 F.interpolate(a, size=(r, r), mode="bilinear", align_corners=False))
        atts.append(a)
    return feats, atts


def condition_inputs(cfg, prompts, aus, n):
    """The conditions FERAnno reads with. `generic` (default) uses one expression-free prompt and
    zero AUs, so the calibrator judges the pixels and cannot echo the preassigned label that the
    sample's own prompt and AU vector were drawn from; `sample` uses them (as in the paper)."""
    import torch

    from synfer import labels as L

    if cfg.condition == "sample":
        return list(prompts), aus
    return [cfg.generic_prompt] * n, torch.zeros(n, len(L.AU_KEYS))

