"""The procedural face world: frontal faces drawn from FACS action units and an identity.

It stands in for FFHQ/AffectNet (docs/design.md, "The procedural face world"): every face comes
with ground-truth AUs, its expression and its identity attributes, so the whole method
runs and is measured on a CPU. Split by job:

- `identity`: who is in the picture (seeded identities, disjoint train/test pools);
- `face_parts`: the draw list of a batch, one function per part of the face (what each AU moves);
- `raster`: pose, rasterisation (PIL, supersampled), lighting and noise -> uint8 faces;
- `source`: the `procedural` Source plugin and the preview grid;
- `commands`: `synfer fetext preview` (hook register_commands).

Nothing here imports torch (numpy and PIL only). The public names are re-exported here.
"""
from __future__ import annotations

from synfer import hookimpl
from synfer_plugins.procedural.identity import (EYE_COLORS, FACIAL_HAIR, GLASSES, HAIR_COLORS, HAIR_STYLES, MAX_IDENTITIES,
                                                SKIN_TONES, SPLIT_OFFSET, Identity, identity_id, sample_expression_aus,
                                                sample_identity, split_identities)
from synfer_plugins.procedural.raster import render_face, render_faces
from synfer_plugins.procedural.source import ProceduralSource, preview_grid

__all__ = ["EYE_COLORS", "FACIAL_HAIR", "GLASSES", "HAIR_COLORS", "HAIR_STYLES", "MAX_IDENTITIES", "SKIN_TONES", "SPLIT_OFFSET",
           "Identity", "ProceduralSource", "identity_id", "preview_grid", "render_face", "render_faces", "sample_expression_aus",
           "sample_identity", "split_identities"]


@hookimpl
def register_stages(register):
    register(ProceduralSource)


@hookimpl
def register_commands(cli):
    from synfer_plugins.procedural.commands import preview

    cli.subgroup("fetext").add_command(preview)
