"""A third-party diffusion backbone in one file: how a lab adds a model family to the `sd` generator (issue 39).

The family: an SD 1.x-layout UNet that also takes the pooled CLIP text embedding as its class embedding
(`class_embed_type="projection"`), the way unCLIP-style models take extra conditioning. Its folders name their
own pipeline, `PooledTextPipeline`, in model_index.json, so the built-in `sd` refuses them and this plugin runs them.

It fills three hooks of the backbone base (`SDModel`, docs/plugins.md "Backbones"): text -> conditioning with the
pooled embedding packed as a trailing token, that conditioning -> the UNet's arguments, and the model index it
writes. Sampling, layout inversion, semantic guidance (which moves the pooled token with the text, Eq. 6), the
AU adapter, FERAnno and the trainings (`synfer train generator | au-adapter | calibrator --generator sd-pooled`)
come with the base.
"""
from __future__ import annotations

import json
from pathlib import Path

from synfer import hookimpl
from synfer_plugins.sd.generator import SDGenerator
from synfer_plugins.sd.model import SDModel
from synfer_plugins.sd.sdxl import pack_extra, unpack_extra


class PooledTextModel(SDModel):
    """SD 1.x components; the UNet's class embedding reads the pooled text embedding."""

    pipeline_classes = ("PooledTextPipeline",)

    def encode_tokens(self, input_ids, encoders=None):
        (encoder,) = encoders or self.text_encoders
        out = encoder(input_ids.to(encoder.device))
        return pack_extra(out.last_hidden_state, out.pooler_output)  # (B, L + 1, D)

    def unet_kwargs(self, latents, text_emb) -> dict:
        context, pooled = unpack_extra(text_emb, self.max_length, self.text_encoder.config.hidden_size)
        return {"encoder_hidden_states": context, "class_labels": pooled}

    def write_model_index(self, path) -> None:
        super().write_model_index(path)  # StableDiffusionPipeline's index, renamed to this family's pipeline
        index = Path(path) / "model_index.json"
        index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": self.pipeline_classes[0]}, indent=2))


class PooledTextGenerator(SDGenerator):
    """The `sd` generator on PooledTextPipeline folders."""

    name = "sd-pooled"
    backbones = (PooledTextModel,)


@hookimpl
def register_stages(register):
    register(PooledTextGenerator)


def build_pooled(folder, captions, sample_size: int = 64) -> Path:
    """A narrow random-weight folder of the family (the tests' base model)."""
    import torch
    from diffusers import UNet2DConditionModel

    from synfer_plugins.sd.testing import sd15_components

    parts = sd15_components(captions, "narrow", sample_size)
    torch.manual_seed(1)
    parts["unet"] = UNet2DConditionModel.from_config(parts["unet"].config, class_embed_type="projection",
                                                     projection_class_embeddings_input_dim=768)
    model = PooledTextModel(**parts)
    model.save_pretrained(folder)
    return Path(folder)
