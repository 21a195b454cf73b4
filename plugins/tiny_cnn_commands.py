"""`synfer train classifier` and `synfer train au-detector`: the tiny-cnn plugin's own commands (hook register_commands)."""
from __future__ import annotations

from pathlib import Path

import click


def _small_cnn_command(task: str, default_out: str):
    @click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="FEText folder (train identities).")
    @click.option("--test", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Held-out FEText folder: report accuracy/UAR or AU F1.")
    @click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help=f"Model folder, e.g. {default_out}.")
    @click.option("--iters", type=int, default=2000, show_default=True)
    @click.option("--batch-size", type=int, default=64, show_default=True)
    @click.option("--lr", type=float, default=2e-3, show_default=True)
    @click.option("--width", type=int, default=32, show_default=True, help="Channels of the first block (x2, x4 deeper).")
    @click.option("--size", type=int, default=64, show_default=True, help="Input side in pixels (32: what the tiny generator's UNet sees).")
    @click.option("--limit", type=int, default=None, help="Use only the first N training images.")
    @click.option("--label-space", default="affectnet8", show_default=True)
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in OUT/work (ends with the weights of an uninterrupted run).")
    @click.option("--checkpoint-interval", type=int, default=None, help="Iterations between checkpoints (default min(500, iters)).")
    @click.option("--threads", type=int, default=None)
    def command(data, test, out, iters, batch_size, lr, width, size, limit, label_space, seed, resume, checkpoint_interval, threads):
        import json

        if threads:
            import torch

            torch.set_num_threads(threads)
        from synfer_plugins.tiny_cnn import train_from_folder

        _, _, metrics = train_from_folder(data, out, task, label_space, iters, batch_size, lr, seed, width, size=size, limit=limit,
                                          resume=resume, test=test, checkpoint_interval=checkpoint_interval)
        click.echo(f"written to {out}")
        if metrics:
            click.echo(json.dumps(metrics, indent=2))

    return command


def add_commands(train: click.Group) -> None:
    train.command("classifier", help="Train the tiny-cnn FER classifier (guidance classifier, expert, oracle) on FEText.")(
        _small_cnn_command("classify", "plugins/models/tiny-cnn"))
    train.command("au-detector", help="Train the au-cnn AU detector on FEText; reports per-AU F1 on --test.")(
        _small_cnn_command("au", "plugins/models/au-cnn"))
