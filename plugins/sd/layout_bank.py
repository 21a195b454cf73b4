"""Layout inversions kept on disk: a face inverted once is never inverted again, by any run.

Layout initialization (paper 4.3) DDIM-inverts a FEText face with the layout prompt, zero AUs and
no guidance: the result ignores the sample, and nearly half a sample's UNet calls are spent on it.
`LayoutInit` keeps inverted faces in RAM for one run; this bank keeps them beside the layout source,
in SOURCE/work/layout-<key>/, one safetensors file per face, so a rerun, a resumed run, another
recipe on the same source and model, and the other torchrun ranks all skip them.

The key covers everything a face's x_t depends on: the model's weights (paths, sizes, modification
times) and the source's metadata, the steps inverted and on what grid, the layout prompt, the batch
shape (a face's bytes depend on it, never on its neighbours), the dtypes, the memory format, the
device type, the CPU's kernel family and the torch version. Files are written under a temporary name
and renamed, so a killed run never leaves half a file, and two ranks writing one face agree.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from synfer.engine.stamps import folder_stamp, stamp_key

log = logging.getLogger(__name__)


def bank_key(model_path, source, settings: dict) -> str:
    """12 hex digits for (model weights, layout source, inversion settings)."""
    stamp = folder_stamp(model_path, (".safetensors", ".bin", ".json")) + folder_stamp(source, (".jsonl",))
    return stamp_key(stamp + [f"{k}={settings[k]}" for k in sorted(settings)])


class LayoutBank:
    """Inverted faces on disk under `folder`, by face file name; `None` as folder: a bank that holds nothing."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.reads = self.writes = 0

    @classmethod
    def open(cls, source: Path, key: str) -> "LayoutBank":
        folder = Path(source) / "work" / f"layout-{key}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only source: the run still works, it just inverts every face
            log.warning("layout bank off: cannot write %s (%s); faces are inverted in every run", folder, e)
            return cls(None)
        if log.isEnabledFor(logging.INFO):  # counting lists the folder: only when someone reads it (synfer -v)
            log.info("layout bank %s: %d inverted faces kept from earlier runs", folder, sum(1 for _ in folder.glob("*.safetensors")))
        return cls(folder)

    def _path(self, face: str, shape: int) -> Path:
        return self.folder / f"{face.replace('/', '__')}@{shape}.safetensors"

    def holds(self, face: str, shape: int) -> bool:
        return self.folder is not None and self._path(face, shape).exists()

    def get(self, face: str, shape: int):
        """-> (x_t as a CPU tensor, its torch memory format) of the face inverted in a batch of `shape`, or None."""
        if not self.holds(face, shape):
            return None
        import torch
        from safetensors import safe_open

        with safe_open(str(self._path(face, shape)), framework="pt") as f:
            x, fmt = f.get_tensor("x_t"), f.metadata().get("memory_format")
        self.reads += 1
        return x, torch.channels_last if fmt == "channels_last" else torch.contiguous_format

    def put(self, face: str, shape: int, x, memory_format) -> None:
        """Keep x_t of the face (inverted in a batch of `shape`); the memory format denoising reads it in goes beside it."""
        if self.folder is None or self.holds(face, shape):
            return
        import torch
        from safetensors.torch import save_file

        path = self._path(face, shape)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        fmt = "channels_last" if memory_format == torch.channels_last else "contiguous"
        try:
            save_file({"x_t": x.detach().to("cpu").contiguous()}, str(tmp), metadata={"memory_format": fmt})
            os.replace(tmp, path)
        except OSError as e:  # e.g. the disk is full: keep running without the bank
            log.warning("layout bank off: cannot write %s (%s)", path, e)
            tmp.unlink(missing_ok=True)
            self.folder = None
            return
        self.writes += 1
