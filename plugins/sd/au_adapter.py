"""AU adapter (paper 4.2.2): AU vector -> MLP -> a few tokens, injected by decoupled cross-attention.

The route uses diffusers' own IP-Adapter machinery, no custom processor:
- `AUProjection` (the MLP) sits inside `MultiIPAdapterImageProjection` as
  `unet.encoder_hid_proj`, with `unet.config.encoder_hid_dim_type = "ip_image_proj"`;
- every cross-attention layer gets the stock `IPAdapterAttnProcessor2_0`, whose
  `to_k_ip`/`to_v_ip` start as copies of the layer's own `to_k`/`to_v` (as the public
  reproduction does), so the AU branch begins in the UNet's own key/value space;
- AUs go in as `added_cond_kwargs={"image_embeds": [aus[:, None, :]]}`, and the
  output is `text_attn + au_scale * au_attn` (FineFace). `au_scale = 0` skips the branch.
Custom `cross_attention_kwargs` are avoided on purpose: diffusers filters or warns
about unknown ones.

AU vectors use the project schema (synfer.labels.AU_KEYS, intensity in [0, 1]); the
saved config records both, and loading refuses an adapter trained on another schema.
The unconditional branch of classifier-free guidance is the all-zero AU vector.
Files: `au_adapter.safetensors` (state dict) + `au_adapter.json` (shape and schema).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from synfer.engine.checkpoints import load_state
from synfer.labels import AU_KEYS, AU_SCALE

WEIGHTS_NAME = "au_adapter.safetensors"
CONFIG_NAME = "au_adapter.json"
IP_ADAPTER_DIR, IP_ADAPTER_WEIGHTS = "ip_adapter", "ip-adapter-au.safetensors"  # the same weights in diffusers' IP-Adapter layout


class AUProjection(nn.Module):
    """The MLP of the paper: (N, num_aus) -> (N, num_tokens, cross_attention_dim)."""

    def __init__(self, num_aus: int, cross_attention_dim: int, num_tokens: int = 4, hidden_dim: int = 256):
        super().__init__()
        self.num_tokens, self.cross_attention_dim = num_tokens, cross_attention_dim
        self.net = nn.Sequential(nn.Linear(num_aus, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_tokens * cross_attention_dim))
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, aus: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(aus).reshape(aus.shape[0], self.num_tokens, self.cross_attention_dim))


def _cross_attention_layers(unet) -> dict[str, nn.Module]:
    """Processor name -> Attention module, for the cross-attention (attn2) layers of a UNet."""
    out = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k") and hasattr(module, "processor"):
            out[f"{name}.processor"] = module
    return out


def _key(processor_name: str) -> str:
    return processor_name.removesuffix(".processor").replace(".", "__")  # ModuleDict keys cannot hold dots


class AUAdapter(nn.Module):
    """The trainable part: the AU projection plus one AU key/value pair per cross-attention layer.

    Its parameters are shared with the UNet it is attached to, so `adapter.parameters()`
    are exactly the parameters that train (paper: "with the diffusion model's parameters
    frozen, we train the AU adapter").
    """

    def __init__(self, layers: dict[str, tuple[int, int]], cross_attention_dim: int, num_tokens: int = 4,
                 hidden_dim: int = 256, au_keys: tuple[str, ...] = AU_KEYS):
        super().__init__()
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        self.au_keys = tuple(au_keys)
        self.layer_shapes = dict(layers)  # processor name -> (hidden_size, cross_attention_dim)
        self.proj = AUProjection(len(self.au_keys), cross_attention_dim, num_tokens, hidden_dim)
        self.attn = nn.ModuleDict({
            _key(name): IPAdapterAttnProcessor2_0(hidden_size=h, cross_attention_dim=c, num_tokens=(num_tokens,), scale=1.0)
            for name, (h, c) in self.layer_shapes.items()
        })
        self._hparams = dict(cross_attention_dim=cross_attention_dim, num_tokens=num_tokens, hidden_dim=hidden_dim)
        self.trained_with: dict = {}  # how it was trained (steps, data, loss weights), kept in au_adapter.json

    # ---------------------------------------------------------------- building
    @classmethod
    def for_unet(cls, unet, num_tokens: int = 4, hidden_dim: int = 256) -> "AUAdapter":
        """A fresh adapter shaped for `unet`, AU key/value projections copied from its to_k/to_v."""
        layers = _cross_attention_layers(unet)
        if not layers:
            raise ValueError("this UNet has no cross-attention layers (attn2): an AU adapter needs a UNet2DConditionModel with cross-attention blocks")
        shapes = {n: (m.to_k.out_features, m.to_k.in_features) for n, m in layers.items()}
        adapter = cls(shapes, cross_attention_dim=unet.config.cross_attention_dim, num_tokens=num_tokens, hidden_dim=hidden_dim)
        with torch.no_grad():
            for name, module in layers.items():
                proc = adapter.attn[_key(name)]
                proc.to_k_ip[0].weight.copy_(module.to_k.weight)
                proc.to_v_ip[0].weight.copy_(module.to_v.weight)
        return adapter.to(device=unet.device, dtype=unet.dtype)

    @property
    def config(self) -> dict:
        return {**self._hparams, "au_keys": list(self.au_keys), "au_scale": AU_SCALE,
                "layers": {n: list(s) for n, s in self.layer_shapes.items()}, **({"trained_with": self.trained_with} if self.trained_with else {})}

    # ---------------------------------------------------------------- unet wiring
    def attach(self, unet) -> None:
        """Install the projection and the IP-Adapter processors into `unet` (idempotent)."""
        procs = dict(unet.attn_processors)
        missing = set(self.layer_shapes) - set(procs)
        if missing:
            raise ValueError(f"AU adapter does not fit this UNet: no cross-attention layers {sorted(missing)[:3]}...; "
                             "it was trained for another UNet architecture")
        for name in self.layer_shapes:
            procs[name] = self.attn[_key(name)]
        unet.set_attn_processor(procs)
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        unet.encoder_hid_proj = MultiIPAdapterImageProjection([self.proj])
        # Attribute only (what diffusers' own IP-Adapter loader does): config.json keeps None,
        # so a saved UNet never depends on the adapter.
        unet.config.encoder_hid_dim_type = "ip_image_proj"

    @staticmethod
    def detach(unet) -> None:
        """Restore plain attention and remove the projection (inverse of `attach`)."""
        from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

        procs = {n: (AttnProcessor2_0() if isinstance(p, IPAdapterAttnProcessor2_0) else p) for n, p in unet.attn_processors.items()}
        unet.set_attn_processor(procs)
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = None

    def set_scale(self, scale: float) -> None:
        """`au_scale`: weight of the AU attention output (0 turns the AU branch off)."""
        for proc in self.attn.values():
            proc.scale = [float(scale)]

    @staticmethod
    def added_cond_kwargs(aus: torch.Tensor) -> dict:
        """What the UNet's forward needs: (N, num_aus) -> {"image_embeds": [(N, 1, num_aus)]}."""
        return {"image_embeds": [aus[:, None, :]]}

    # ---------------------------------------------------------------- files
    def ip_adapter_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The adapter in diffusers' IP-Adapter weight layout ({"image_proj": ..., "ip_adapter": ...}).

        The AU MLP (Linear(16, hidden), GELU, Linear(hidden, tokens * dim), reshape, LayerNorm(dim)) is
        exactly diffusers' `IPAdapterFaceIDImageProjection` with mult = hidden / 16 (its checkpoint keys
        `proj.0`, `proj.2`, `norm`); the per-layer AU key/value projections are `<2i+1>.to_k_ip` /
        `<2i+1>.to_v_ip` for the i-th cross-attention layer, the numbering `load_ip_adapter` expects.
        `pipe.load_ip_adapter(folder, subfolder="ip_adapter", weight_name="ip-adapter-au.safetensors",
        image_encoder_folder=None)` and `pipe.set_ip_adapter_scale(au_scale)`, then per prompt
        `ip_adapter_image_embeds=[torch.cat([zeros, au])[:, None]]` (one (1, 16) AU vector, the unconditional
        half first; diffusers repeats these embeds for every prompt of a call) reproduce synfer's sampling."""
        if self.proj.net[0].out_features % self.proj.net[0].in_features:
            raise ValueError(f"hidden_dim {self.proj.net[0].out_features} is not a multiple of the {len(self.au_keys)} AUs: diffusers' "
                             "FaceID image projection (mult = hidden / inputs) cannot hold this AU MLP")
        net = self.proj.net
        image_proj = {"proj.0.weight": net[0].weight, "proj.0.bias": net[0].bias, "proj.2.weight": net[2].weight,
                      "proj.2.bias": net[2].bias, "norm.weight": self.proj.norm.weight, "norm.bias": self.proj.norm.bias}
        ip = {}
        for i, name in enumerate(self.layer_shapes):  # UNet module order, as unet.attn_processors lists them
            proc = self.attn[_key(name)]
            ip[f"{2 * i + 1}.to_k_ip.weight"] = proc.to_k_ip[0].weight
            ip[f"{2 * i + 1}.to_v_ip.weight"] = proc.to_v_ip[0].weight
        return {"image_proj": image_proj, "ip_adapter": ip}

    def save(self, folder: str | Path) -> None:
        """au_adapter.safetensors + au_adapter.json, and the same weights as ip_adapter/ip-adapter-au.safetensors."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cpu = lambda v: v.detach().to("cpu").contiguous()  # noqa: E731
        state = {k: cpu(v) for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "au_keys": ",".join(self.au_keys)})
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        ip = {f"{part}.{k}": cpu(v) for part, sd in self.ip_adapter_state_dict().items() for k, v in sd.items()}
        (folder / IP_ADAPTER_DIR).mkdir(exist_ok=True)
        save_file(ip, str(folder / IP_ADAPTER_DIR / IP_ADAPTER_WEIGHTS), metadata={"format": "pt", "au_keys": ",".join(self.au_keys)})

    @classmethod
    def load(cls, folder: str | Path, device="cpu", dtype=None) -> "AUAdapter":

        folder = Path(folder)
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        keys = tuple(cfg.get("au_keys", AU_KEYS))
        if keys != AU_KEYS or cfg.get("au_scale", AU_SCALE) != AU_SCALE:
            raise ValueError(f"{folder / CONFIG_NAME} was trained on AUs {list(keys)} ({cfg.get('au_scale')}); this synfer uses "
                             f"{list(AU_KEYS)} ({AU_SCALE}). Retrain it with 'synfer train au-adapter' or convert the AU schema.")
        adapter = cls({n: tuple(s) for n, s in cfg["layers"].items()}, cfg["cross_attention_dim"], cfg["num_tokens"], cfg["hidden_dim"], keys)
        adapter.trained_with = cfg.get("trained_with", {})
        load_state(adapter, folder / WEIGHTS_NAME, folder / WEIGHTS_NAME,
                   "The adapter belongs to another UNet: retrain it with 'synfer train au-adapter --model THIS_MODEL'.")
        return adapter.to(device=device, dtype=dtype)

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / WEIGHTS_NAME).exists() and (Path(folder) / CONFIG_NAME).exists()
