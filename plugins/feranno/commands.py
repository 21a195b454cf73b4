"""`synfer train calibrator`: the FERAnno plugin's command (hook register_commands)."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("calibrator")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="FEText folder (train identities).")
@click.option("--model", required=True, help="The generator folder whose UNet FERAnno reads (frozen).")
@click.option("--generator", "generator", default="synfer:sd", show_default=True,
              help="Generator plugin that loads --model (any with the DiffusionBackbone attributes, e.g. a backbone plugin's).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="FERAnno folder, e.g. plugins/models/feranno.")
@click.option("--test", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Held-out FEText: report accuracy and UAR.")
@click.option("--iters", type=int, default=800, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--dim", type=int, default=64, show_default=True, help="Channels of the dual-branch encoder.")
@click.option("--condition", type=click.Choice(["generic", "sample"]), default="generic", show_default=True,
              help="Conditions of the UNet pass: one expression-free prompt with zero AUs, or each sample's own.")
@click.option("--pool", type=int, default=4, show_default=True, help="Grid each scale is pooled to before the head (1: global average).")
@click.option("--max-res", type=int, default=None,
              help="Finer feature maps (and their attention maps) are average-pooled to this side first; default: 16, or the "
                   "UNet's latent side if smaller (the shipped FERAnno: 16, +6 points over 8, ~3.5x the CPU time per face).")
@click.option("--order", type=click.Choice(["coarse-to-fine", "fine-to-coarse"]), default="fine-to-coarse", show_default=True,
              help="Direction the encoder carries its state between scales (fine-to-coarse: a CNN-like pyramid; +1 to +2.5 points).")
@click.option("--timestep", type=int, default=1, show_default=True, help="Eq. 1 timestep the faces are noised to before the UNet pass (paper: 1).")
@click.option("--device", default=None, help="Where the UNet pass and the encoder run (default: cuda if there is one, else cpu).")
@click.option("--no-cache", is_flag=True, help="Do not keep the extracted UNet features in OUT/work (they are extracted once either way).")
@click.option("--views", type=int, default=1, show_default=True,
              help="Captures per training face: 1 + (views - 1) copies shifted by up to 2 px (augmentation for cached features).")
@click.option("--mixup", type=float, default=0.0, show_default=True,
              help="Mix pairs of cached captures and their labels with a Beta(a, a) weight (augmentation for cached features); 0: off.")
@click.option("--limit", type=int, default=None)
@click.option("--label-space", default="affectnet8", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True)
@click.option("--threads", type=int, default=None)
def train_calibrator_cmd(data, model, generator, out, test, iters, batch_size, lr, dim, condition, pool, max_res, order, timestep, device, no_cache, views, mixup,
                         limit, label_space, seed, resume, threads):
    """Train FERAnno (paper 4.4) on FEText with the generator's UNet frozen."""
    import json

    from synfer.engine.training import seed_everything
    from synfer_plugins.feranno.train import train_feranno

    seed_everything(seed)  # --seed fixes the whole run, the encoder's initial weights included
    _, _, metrics = train_feranno(data, model, out, test=test, iters=iters, batch_size=batch_size, lr=lr, seed=seed,
                                   label_space=label_space, dim=dim, condition=condition, limit=limit, resume=resume, threads=threads,
                                   pool=pool, max_res=max_res, t=timestep, order=order, device=device, cache=not no_cache, views=views, mixup=mixup,
                                   generator=generator)
    click.echo(f"written to {out}")
    if metrics:
        click.echo(json.dumps(metrics, indent=2))


def add_commands(train: click.Group) -> None:
    train.add_command(train_calibrator_cmd)
