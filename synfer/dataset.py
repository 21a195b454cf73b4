"""The one on-disk format of the project: images + `metadata.jsonl`.

`<dir>/metadata.jsonl` has one JSON object per image with at least `file_name`
(relative to `<dir>`); images live under `<dir>/images/`. The folder loads as is with
`datasets.load_dataset("imagefolder", data_dir=<dir>)`. Writes are atomic: the image goes to a
temp file and is renamed, and its metadata line is appended (and fsynced) only after
the image is on disk, so a crash never leaves a listed-but-missing file and a rerun
skips what is done.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

METADATA = "metadata.jsonl"
IMAGES = "images"


class DatasetError(Exception):
    pass


def image_name(index: int, ext: str = "png") -> str:
    return f"{IMAGES}/{index:08d}.{ext}"


def _read_lines(path: Path) -> tuple[list[dict], int]:
    """Complete JSON lines and the byte length they span (a torn last line is dropped)."""
    rows, good = [], 0
    if not path.exists():
        return rows, 0
    data = path.read_bytes()
    pos = 0
    for line in data.splitlines(keepends=True):
        pos += len(line)
        if not line.endswith(b"\n"):
            break
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        good = pos
    return rows, good


class DatasetWriter:
    """Append-only writer; `done` holds the indices already on disk (for resume)."""

    def __init__(self, root: str | os.PathLike, ext: str = "png", compress_level: int = 1):
        self.root = Path(root)
        self.ext = ext
        self.compress_level = compress_level  # PNG level 1: ~35% faster to encode than 6, ~11% larger
        (self.root / IMAGES).mkdir(parents=True, exist_ok=True)
        self.meta_path = self.root / METADATA
        rows, good = _read_lines(self.meta_path)
        if self.meta_path.exists() and good != self.meta_path.stat().st_size:
            with open(self.meta_path, "r+b") as f:  # drop a line torn by a crash
                f.truncate(good)
        self.rows = [r for r in rows if (self.root / r["file_name"]).exists()]
        if len(self.rows) != len(rows):  # an image vanished: rewrite metadata without it
            self._rewrite()
        self.done = {r["index"] for r in self.rows if "index" in r}

    def _rewrite(self) -> None:
        tmp = self.meta_path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.meta_path)

    def _put_image(self, index: int, image, sync: bool) -> str:
        name = image_name(index, self.ext)
        final = self.root / name
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as f:
            image.save(f, format="PNG" if self.ext == "png" else self.ext.upper(), compress_level=self.compress_level)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
        return name

    def _append(self, rows: list[dict]) -> None:
        with open(self.meta_path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        self.rows.extend(rows)
        self.done.update(r["index"] for r in rows)

    @staticmethod
    def _row(name: str, index: int, record: dict[str, Any]) -> dict:
        return {"file_name": name, "index": index, **{k: v for k, v in record.items() if k not in ("file_name", "index")}}

    def write(self, index: int, image, record: dict[str, Any]) -> str:
        """Write one image (PIL) and its metadata; returns its `file_name`."""
        name = self._put_image(index, image, sync=True)
        self._append([self._row(name, index, record)])
        return name

    def write_many(self, items: list[tuple[int, Any, dict[str, Any]]]) -> list[str]:
        """Write a batch: every image renamed into place, one sync, then all metadata lines in one
        append. Images are on disk before any line names them (same guarantee as `write`)."""
        names = [self._put_image(i, im, sync=False) for i, im, _ in items]
        if names:
            os.sync()
            self._append([self._row(n, i, rec) for n, (i, _, rec) in zip(names, items)])
        return names


def read_metadata(root: str | os.PathLike, verify: bool = True) -> list[dict]:
    """Rows of `metadata.jsonl`; with `verify`, every listed file must exist."""
    root = Path(root)
    path = root / METADATA
    if not path.exists():
        raise DatasetError(f"{root} is not a synfer dataset: no {METADATA}. Build one with 'synfer run' or 'synfer fetext build'.")
    rows, _ = _read_lines(path)
    if verify:
        missing = [r["file_name"] for r in rows if not (root / r["file_name"]).exists()]
        if missing:
            raise DatasetError(f"{len(missing)} file(s) listed in {path} are missing, e.g. {missing[:3]}; rerun the command that wrote it to repair")
    return sorted(rows, key=lambda r: r.get("index", 0))


def iter_images(root: str | os.PathLike, rows: list[dict] | None = None) -> Iterator[tuple[dict, Any]]:
    from PIL import Image

    root = Path(root)
    for r in rows if rows is not None else read_metadata(root):
        with Image.open(root / r["file_name"]) as im:
            yield r, im.convert("RGB")
