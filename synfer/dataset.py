"""The one on-disk format of the project: images + `metadata.jsonl`.

`<dir>/metadata.jsonl` has one JSON object per image with at least `file_name`
(relative to `<dir>`); images live under `<dir>/images/`. The folder loads as is with
`datasets.load_dataset("imagefolder", data_dir=<dir>)`. Writes are atomic: the image goes to a
temp file and is renamed, and its metadata line is appended (and fsynced) only after
the image is on disk, so a crash never leaves a listed-but-missing file and a rerun
skips what is done.

Under torchrun each rank appends to its own part, `<dir>/.parts/rank-NNNNN.jsonl`, and
`merge()` folds the parts into `metadata.jsonl` (sorted by index, written atomically, parts
removed last), so N workers leave exactly the files one worker leaves, and a merge killed at
any moment is simply redone.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, ValidationError

from synfer.faults import crash_point

METADATA = "metadata.jsonl"
IMAGES = "images"
PARTS = ".parts"


class DatasetError(Exception):
    pass


class DatasetRow(BaseModel):
    """One line of `metadata.jsonl`, as every reader sees it (report, evaluators, calibrate, benchmark).

    Two kinds of rows share the file format:
    - generated rows (`synfer run`): `label` is the final class *name*, beside `preassigned_label`
      and `kept`;
    - labelled rows (`synfer fetext build`, real sets): `expression` is the class name and `label`
      its *index* in the build's label space (kept for `datasets.load_dataset` users).
    Read the class through `row_label()`, never through `label` directly. Other keys (aus,
    prompt, predictions, ...) pass through untouched; the on-disk format is unchanged.
    """

    model_config = ConfigDict(extra="allow")

    file_name: str
    index: int | None = None
    label: str | int | None = None
    expression: str | None = None
    preassigned_label: str | None = None
    kept: bool = True
    aus: dict[str, float] | None = None

    @property
    def generated(self) -> bool:
        return self.preassigned_label is not None


def row_label(row: dict | DatasetRow) -> str | None:
    """The class of a row, canonical: a generated row's final `label`, a labelled row's
    `expression`; None for an unlabelled row. An index `label` without `expression` (a
    hand-made row) is refused: the index means nothing without its label space."""
    from synfer import labels as L

    get = row.get if isinstance(row, dict) else lambda k, d=None: getattr(row, k, d)
    label, expression = get("label"), get("expression")
    if isinstance(label, str) and label:
        return L.canonical(label)
    if expression:
        return L.canonical(expression)
    if label is not None and not isinstance(label, bool):
        raise DatasetError(f"row {get('file_name')!r} has an index label ({label!r}) but no 'expression': "
                           "write the class name in 'expression' (as 'synfer fetext build' does)")
    return None


def parse_rows(rows: list[dict], path: Path | str = METADATA) -> list[dict]:
    """Check every row against `DatasetRow`; a bad row fails with its line number and what is wrong."""
    for n, r in enumerate(rows, 1):
        try:
            DatasetRow.model_validate(r)
        except ValidationError as exc:
            what = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise DatasetError(f"{path}: row {n} is not a synfer dataset row ({what}); expected at least "
                               "file_name (and label/expression for labelled sets)") from None
    return rows


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


def _repair(path: Path, root: Path) -> list[dict]:
    """Rows of one metadata file after a crash: a torn last line is cut off, and rows whose
    image vanished are dropped (the file is rewritten atomically without them)."""
    rows, good = _read_lines(path)
    if path.exists() and good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    kept = [r for r in rows if (root / r["file_name"]).exists()]
    if len(kept) != len(rows):
        _write_rows(path, kept)
    return kept


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[IO[bytes]], None], sync: bool = True) -> Path:
    """The one way synfer replaces a file: write `<dir>/.<name>.tmp`, fsync (unless `sync` is
    False), rename over `path`. A kill at any moment leaves the old file or the new one, never
    half of one. `data` is text (UTF-8), bytes, or a function that writes into the open file
    (e.g. `lambda f: image.save(f, format="PNG")`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj, **kwargs) -> Path:
    """`obj` as indented JSON, atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, **kwargs))


def _write_rows(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def part_name(rank: int) -> str:
    return f"{PARTS}/rank-{rank:05d}.jsonl"


def _part_paths(root: Path) -> list[Path]:
    return sorted((root / PARTS).glob("rank-*.jsonl")) if (root / PARTS).is_dir() else []


def collect_rows(root: Path, repair: Path | None = None) -> list[dict]:
    """Rows of `metadata.jsonl` and of every rank's part: one per index (the first seen wins),
    only those whose image exists, sorted by index. `repair` names the one file this process
    owns and may fix in place (see `_repair`); the others are only read."""
    by_index: dict[int, dict] = {}
    loose = []
    for path in [root / METADATA, *_part_paths(root)]:
        for r in _repair(path, root) if path == repair else _read_lines(path)[0]:
            if "index" not in r:
                loose.append(r)
            elif r["index"] not in by_index and (root / r["file_name"]).exists():
                by_index[r["index"]] = r
    return loose + sorted(by_index.values(), key=lambda r: r["index"])


class DatasetWriter:
    """Append-only writer; `done` holds the indices already on disk, in the main file or in any
    rank's part (for resume, also when the number of workers changed).

    `part=None` appends to `metadata.jsonl`; `part=part_name(rank)` to that rank's part.
    Leftovers of a crash (half-written `.tmp` images, a torn line) are cleaned up on open.
    """

    def __init__(self, root: str | os.PathLike, ext: str = "png", compress_level: int = 1, part: str | None = None):
        self.root = Path(root)
        self.ext = ext
        self.compress_level = compress_level  # PNG level 1: ~35% faster to encode than 6, ~11% larger
        (self.root / IMAGES).mkdir(parents=True, exist_ok=True)
        self.meta_path = self.root / (part or METADATA)
        self.meta_path.parent.mkdir(parents=True, exist_ok=True)
        if part is None:  # the single writer owns the folder: temp files of a killed run are orphans
            for tmp in (self.root / IMAGES).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        self.rows = collect_rows(self.root, repair=self.meta_path)
        self.done = {r["index"] for r in self.rows if "index" in r}

    def _put_image(self, index: int, image, sync: bool) -> str:
        name = image_name(index, self.ext)
        fmt = "PNG" if self.ext == "png" else self.ext.upper()
        atomic_write(self.root / name, lambda f: image.save(f, format=fmt, compress_level=self.compress_level), sync=sync)
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
            crash_point("write")
            self._append([self._row(n, i, rec) for n, (i, _, rec) in zip(names, items)])
        return names


def merge(root: str | os.PathLike) -> list[dict]:
    """Fold every rank's part into `metadata.jsonl`: one row per index (rows whose image is
    missing are left out), sorted by index, written atomically; the parts go only after the
    merged file is in place. Idempotent, so a merge killed at any point is redone by rerunning."""
    root = Path(root)
    rows = collect_rows(root)
    crash_point("merge")
    _write_rows(root / METADATA, rows)
    crash_point("merged")
    for path in _part_paths(root):
        path.unlink()
    if (root / PARTS).is_dir() and not any((root / PARTS).iterdir()):
        (root / PARTS).rmdir()
    for tmp in (root / IMAGES).glob(".*.tmp"):  # half-written images of killed ranks
        tmp.unlink(missing_ok=True)
    return rows


def read_metadata(root: str | os.PathLike, verify: bool = True) -> list[dict]:
    """Rows of `metadata.jsonl`; with `verify`, every listed file must exist."""
    root = Path(root)
    path = root / METADATA
    if not path.exists():
        raise DatasetError(f"{root} is not a synfer dataset: no {METADATA}. Build one with 'synfer run' or 'synfer fetext build'.")
    rows, _ = _read_lines(path)
    parse_rows(rows, path)
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
