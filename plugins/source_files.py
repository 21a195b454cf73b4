"""Reading the files of real FER datasets: images at any bit depth as 8-bit RGB, and CSV/label
files whose layout is checked up front (one error naming the file, the missing column and the
expected layout), so a source never yields a white face, a wrong label or nothing, silently;
and the base every dataset source shares (skipped files, filtered rows, limit).
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Iterator

from pydantic import Field, field_validator

from synfer import labels as L
from synfer.engine.dataset import DatasetError
from synfer.stages import FaceRecord, Source, StageConfig


def load_image(path: Path, max_pixels: int | None = None, min_size: int = 1):
    """(RGB PIL image, None), or (None, why) when the file is missing, truncated, not an image,
    larger than `max_pixels` or with a side below `min_size` (both checked from the header,
    before any pixel is decoded). Grey, palette, CMYK and alpha images come back as RGB;
    16- and 32-bit integer and float images are scaled to 8 bits first (see `to_rgb8`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                return None, f"too large: {w}x{h} > max_pixels {max_pixels}"
            if min(w, h) < min_size:
                return None, f"too small: {w}x{h}, a side below min_size {min_size}"
            im.load()  # decode now: a truncated file fails here, not later in the upscaler
            return to_rgb8(im), None
    except FileNotFoundError:
        return None, "missing"
    except Image.DecompressionBombError as exc:
        return None, f"too large ({exc})"
    except (OSError, ValueError, SyntaxError) as exc:
        return None, f"unreadable: {exc}"


def to_rgb8(im):
    """A PIL image of any mode -> 8-bit RGB. PIL's own convert("RGB") clips 16/32-bit values at 255
    (a 16-bit face comes out white), so those are scaled first: "I;16*" by 65535; "I" by 255, 65535
    or 2**32-1, the smallest range that holds its values; float "F" in [0, 1] by 1, else by 255
    (or its maximum when above). Negative values become 0."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if not (mode in ("I", "F") or mode.startswith("I;")):
        return im.convert("RGB")
    a = np.asarray(im).astype(np.float64)
    top = float(a.max()) if a.size else 0.0
    if mode.startswith("I;16"):
        scale = 65535.0
    elif mode == "F":
        scale = 1.0 if top <= 1.0 else max(255.0, top)
    else:
        scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else float(2**32 - 1)
    grey = np.clip(np.round(a * (255.0 / scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


class SourceSchemaError(DatasetError, ValueError):
    """A label file or CSV that does not have the layout its source reads (one line: file, what is missing, what was expected)."""


def open_table(path: Path, source: str, required: list[str], expected: str):
    """A csv.DictReader over `path` after checking, up front, that it is text with a header holding `required`.

    Raises SourceSchemaError naming the file, the missing column(s) and the expected layout; a
    missing file raises FileNotFoundError with the same details."""
    import io

    if not path.is_file():
        raise FileNotFoundError(f"{source} source: {path} does not exist; expected {expected}")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b"\0" in head:
        raise SourceSchemaError(f"{source} source: {path} is a binary file, not a CSV; expected {expected}")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise SourceSchemaError(f"{source} source: {path} is not UTF-8 text (byte {exc.start}); expected {expected}") from None
    f = open(path, newline="", encoding="utf-8-sig", errors="replace")
    reader = csv.DictReader(f)
    header = reader.fieldnames
    if not header:
        f.close()
        raise SourceSchemaError(f"{source} source: {path} is empty; expected {expected}")
    header = [h.strip() for h in header]
    reader.fieldnames = header
    missing = [c for c in required if c not in header]
    if missing:
        f.close()
        raise SourceSchemaError(f"{source} source: {path} has no column {', '.join(missing)} (its header: "
                                f"{', '.join(header)[:200]}); expected {expected}")
    return f, reader


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DatasetSourceConfig(StageConfig):
    root: str  # the dataset folder
    label_space: str = "affectnet8"  # keep only classes of this space (synfer.labels.LABEL_SPACES)
    limit: int | None = Field(None, gt=0)  # stop after this many records
    tag: str | None = None  # `source` written into the metadata; default: the plugin name
    max_pixels: int = Field(40_000_000, gt=0)  # bigger images are skipped unread (a 40 MP face crop is already absurd)
    min_size: int = Field(16, ge=1)  # images (face crops) with a side below this are skipped: upscaled they are a flat blur

    @field_validator("label_space")
    @classmethod
    def _known_space(cls, v):
        L.label_space(v)
        return v


class DatasetSource(Source):
    """Bookkeeping shared by the dataset readers (synfer_plugins.sources): skipped files, filtered rows, limit."""

    Config = DatasetSourceConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.skipped: list[str] = []  # "path (why)" of files that could not be read
        self.filtered: Counter[str] = Counter()  # reason -> rows left out on purpose
        self._space = L.label_space(self.config.label_space)

    @property
    def tag(self) -> str:
        return self.config.tag or self.name

    def _root(self) -> Path:
        root = Path(self.config.root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"{self.name} source: root {str(root)!r} does not exist; set `root:` to the dataset folder")
        return root

    def _load(self, path: Path):
        """The RGB image at `path`, or None with "path (why)" added to `skipped`."""
        image, why = load_image(path, self.config.max_pixels, self.config.min_size)
        if image is None:
            self.skipped.append(f"{path} ({why})")
        return image

    def _big_enough(self, image, where: str) -> bool:
        """False (and `where` skipped with the reason) when a crop has a side below min_size."""
        if min(image.size) < self.config.min_size:
            self.skipped.append(f"{where} (too small: {image.width}x{image.height}, a side below min_size {self.config.min_size})")
            return False
        return True

    def _keep(self, expression: str) -> bool:
        if expression not in self._space:
            self.filtered[f"{expression} not in {self.config.label_space}"] += 1
            return False
        return True

    def _stream(self) -> Iterator[FaceRecord]:
        raise NotImplementedError

    def records(self) -> Iterator[FaceRecord]:
        self.skipped, self.filtered = [], Counter()
        for n, record in enumerate(self._stream()):
            if self.config.limit is not None and n >= self.config.limit:
                return
            yield record
