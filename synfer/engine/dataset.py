"""The one on-disk format of the project: images + `metadata.jsonl`.

`<dir>/metadata.jsonl` has one JSON object per image with at least `file_name`
(relative to `<dir>`); images live under `<dir>/images/`: flat (`images/00012345.png`, the default), or in
sub-folders of at most N images each (`images/00012/00012345.png` for N = 1000, the recipe's
`images_per_folder`), which a filesystem and a copy to a hub handle at a million images. The folder loads as is with
`datasets.load_dataset("imagefolder", data_dir=<dir>)`. Writes are atomic: the image goes to a
temp file and is renamed, and its metadata line is appended (and fsynced) only after
the image is on disk, so a crash never leaves a listed-but-missing file and a rerun
skips what is done.

Under torchrun each rank appends to its own part, `<dir>/.parts/rank-NNNNN.jsonl`, and
`merge()` folds the parts into `metadata.jsonl` (sorted by index, written atomically, parts
removed last), so N workers leave exactly the files one worker leaves, and a merge killed at
any moment is simply redone.

At the paper's scale (~1.4M rows) nothing here holds every row: a writer opens with the indices
on disk as a bitmap (`DoneIndex`), `merge` streams the lines in index order, and `iter_metadata`
yields the rows one at a time (`synfer.engine.rowscan`).
"""
from __future__ import annotations

import json
import os
from array import array
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from synfer.contract.rows import (  # noqa: F401 (the row format, re-exported: readers import it from here)
    IMAGES,
    METADATA,
    PARTS,
    DatasetError,
    DatasetRow,
    check_row,
    image_name,
    not_a_dataset,
    parse_rows,
    row_label,
    torn,
)
from synfer.engine.faults import crash_point
from synfer.engine.rowscan import BUFFER, DoneIndex, LineScan, Rows, image_exists


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
    """Rows of one metadata file after a crash (see `_repair_file`)."""
    _repair_file(path, root)
    return _read_lines(path)[0]


def _repair_file(path: Path, root: Path, done: DoneIndex | None = None) -> None:
    """A metadata file after a crash, streamed: a torn last line is cut off, and rows whose image vanished are
    dropped (the file is rewritten atomically without them, the other lines' bytes kept). `done` gets the indices
    of the rows that stay."""
    scan, gone, base = LineScan(path), [], str(root)
    for off, _, index, name in scan:
        if not image_exists(base, name):
            gone.append(off)
        elif done is not None and index is not None:
            done.add(index)
    if path.exists() and scan.good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(scan.good)
    if gone:
        drop = set(gone)
        atomic_write(path, lambda out: out.writelines(line for off, line, *_ in LineScan(path) if off not in drop))


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


def _remove_temp_images(folder: Path) -> None:
    """Delete `.<name>.tmp` files (atomic_write's temp files) in `folder` and its sub-folders (the
    `images_per_folder` layout), streaming each listing (`Path.glob` lists a folder whole: ~200 bytes per image,
    280 MB for the paper's 1.4M)."""
    if not folder.is_dir():
        return
    subs = []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith(".") and e.name.endswith(".tmp") and len(e.name) >= 5:
                Path(e.path).unlink(missing_ok=True)
            elif e.is_dir(follow_symlinks=False):
                subs.append(e.path)
    for sub in subs:
        _remove_temp_images(Path(sub))


def scan_done(root: Path, repair: Path | None = None) -> DoneIndex:
    """The indices on disk: rows of `metadata.jsonl` and of every rank's part whose image exists, as a bitmap
    (the indices `collect_rows` would return, without holding a row). `repair` as in `collect_rows`."""
    done, base = DoneIndex(), str(root)
    for path in [root / METADATA, *_part_paths(root)]:
        if path == repair:
            _repair_file(path, root, done)
            continue
        for _, _, index, name in LineScan(path):
            if index is not None and index not in done and image_exists(base, name):
                done.add(index)
    return done


def iter_rows(root: Path) -> Iterator[dict]:
    """The rows `collect_rows` returns, one at a time and in file order (not sorted): for a look at what is on
    disk (`check_resume`) without holding it."""
    seen, base = DoneIndex(), str(root)
    for path in [root / METADATA, *_part_paths(root)]:
        for _, line, index, name in LineScan(path):
            if index is None:
                yield json.loads(line)
            elif index not in seen and image_exists(base, name):
                seen.add(index)
                yield json.loads(line)


class DatasetWriter:
    """Append-only writer; `done` holds the indices already on disk, in the main file or in any
    rank's part (for resume, also when the number of workers changed), one bit each.

    `part=None` appends to `metadata.jsonl`; `part=part_name(rank)` to that rank's part.
    `images_per_folder` N puts sample i in `images/<i // N>/` (see `image_name`); None keeps one flat `images/`.
    Leftovers of a crash (half-written `.tmp` images, a torn line) are cleaned up on open.
    """

    def __init__(self, root: str | os.PathLike, ext: str = "png", compress_level: int = 1, part: str | None = None,
                 images_per_folder: int | None = None):
        self.root = Path(root)
        self.ext = ext
        image_name(0, ext, images_per_folder)  # a bad value fails here, before anything is written
        self.images_per_folder = images_per_folder
        self._folders: set[str] = set()  # sub-folders made by this writer (one mkdir each, not one per image)
        self.compress_level = compress_level  # PNG level 1: ~35% faster to encode than 6, ~11% larger
        (self.root / IMAGES).mkdir(parents=True, exist_ok=True)
        self.meta_path = self.root / (part or METADATA)
        self.meta_path.parent.mkdir(parents=True, exist_ok=True)
        if part is None:  # the single writer owns the folder: temp files of a killed run are orphans
            _remove_temp_images(self.root / IMAGES)
        self.done = scan_done(self.root, repair=self.meta_path)
        self._rows: list[dict] | None = None

    @property
    def rows(self) -> list[dict]:
        """Every row on disk, as `collect_rows` gives them: read on first use (the FEText and label builders use
        them; a run needs only `done`)."""
        if self._rows is None:
            self._rows = collect_rows(self.root)
        return self._rows

    def _put_image(self, index: int, image, sync: bool) -> str:
        name = image_name(index, self.ext, self.images_per_folder)
        folder = name.rpartition("/")[0]
        if folder != IMAGES and folder not in self._folders:
            (self.root / folder).mkdir(exist_ok=True)  # ranks share folders: exist_ok makes the race harmless
            self._folders.add(folder)
        fmt = "PNG" if self.ext == "png" else self.ext.upper()
        atomic_write(self.root / name, lambda f: image.save(f, format=fmt, compress_level=self.compress_level), sync=sync)
        return name

    def _append(self, rows: list[dict]) -> None:
        with open(self.meta_path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        if self._rows is not None:
            self._rows.extend(rows)
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


def merge(root: str | os.PathLike) -> Rows:
    """Fold every rank's part into `metadata.jsonl`: one row per index (rows whose image is
    missing are left out), sorted by index, written atomically; the parts go only after the
    merged file is in place. Idempotent, so a merge killed at any point is redone by rerunning.

    Streamed: a first pass notes where each index's first row is (12 bytes per index), a second copies
    those lines in index order, bytes as written (rows without an index first, as `collect_rows` orders
    them). A `metadata.jsonl` already in that form, with no parts, is left as it is. Returns the merged rows
    as a `Rows` view (parsed when iterated)."""
    root = Path(root)
    files, base = [root / METADATA, *_part_paths(root)], str(root)
    done, fid, off = DoneIndex(), array("I"), array("q")  # per index: which file, where in it
    loose: list[tuple[int, int]] = []
    whole = True  # metadata.jsonl alone, every line taken, in order: the merge would write it back unchanged
    last = -1
    for k, path in enumerate(files):
        scan = LineScan(path)
        for pos, _, index, name in scan:
            if index is None:
                loose.append((k, pos))
                whole = whole and last < 0
                continue
            if index in done or not image_exists(base, name):
                whole = False
                continue
            done.add(index)
            if index >= len(off):
                grow = max(index + 1 - len(off), len(off))
                fid.extend(array("I", bytes(4 * grow)))
                off.extend(array("q", bytes(8 * grow)))
            fid[index], off[index] = k, pos
            whole = whole and index > last
            last = max(last, index)
        whole = whole and (k > 0 or (not scan.blank and scan.good == (path.stat().st_size if path.exists() else 0)))
    whole = whole and len(files) == 1 and files[0].exists()
    crash_point("merge")
    if not whole:
        handles = [open(p, "rb", buffering=BUFFER) if p.exists() else None for p in files]
        try:
            def write(out):
                for k, pos in loose:
                    handles[k].seek(pos)
                    out.write(handles[k].readline())
                for index in done:
                    f, pos = handles[fid[index]], off[index]
                    if f.tell() != pos:
                        f.seek(pos)
                    out.write(f.readline())
            atomic_write(root / METADATA, write)
        finally:
            for f in handles:
                if f is not None:
                    f.close()
    crash_point("merged")
    for path in _part_paths(root):
        path.unlink()
    if (root / PARTS).is_dir() and not any((root / PARTS).iterdir()):
        (root / PARTS).rmdir()
    _remove_temp_images(root / IMAGES)  # half-written images of killed ranks
    return Rows(root / METADATA, len(loose) + len(done))


def read_metadata(root: str | os.PathLike, verify: bool = True) -> list[dict]:
    """Rows of `metadata.jsonl`; with `verify`, every listed file must exist."""
    root = Path(root)
    path = root / METADATA
    if not path.exists():
        raise not_a_dataset(root)
    rows, good = _read_lines(path)
    if good != path.stat().st_size:  # a torn or garbled line: reading on would silently drop rows
        raise torn(path, len(rows) + 1)
    parse_rows(rows, path)
    if verify:
        missing = [r["file_name"] for r in rows if not (root / r["file_name"]).exists()]
        if missing:
            raise DatasetError(f"{len(missing)} file(s) listed in {path} are missing, e.g. {missing[:3]}; rerun the command that wrote it to repair")
    return sorted(rows, key=lambda r: r.get("index", 0))


def iter_metadata(root: str | os.PathLike, verify: bool = True) -> Iterator[dict]:
    """The rows `read_metadata` returns, in the same order and with the same checks, one at a time: for readers
    of a million-row folder (report, eval, calibrate). A first pass checks the file is whole (and, with `verify`,
    every listed file exists) before any row is yielded, and notes where each row is (16 bytes a row); a row that
    is not a synfer dataset row fails when it is reached."""
    root = Path(root)
    path = root / METADATA
    if not path.exists():
        raise not_a_dataset(root)
    scan, base = LineScan(path), str(root)
    keys, offs = array("q"), array("q")
    missing, first_missing, ordered, last = 0, [], True, None
    for pos, _, index, name in scan:
        if verify and name is not None and not image_exists(base, name):
            missing += 1
            first_missing += [name] if len(first_missing) < 3 else []
        key = index if index is not None else 0  # read_metadata sorts by r.get("index", 0)
        ordered = ordered and (last is None or key >= last)
        last = key
        keys.append(key)
        offs.append(pos)
    if scan.good != path.stat().st_size:
        raise torn(path, scan.rows + 1)
    if missing:
        raise DatasetError(f"{missing} file(s) listed in {path} are missing, e.g. {first_missing}; rerun the command that wrote it to repair")
    if ordered:
        order = range(len(offs))
    else:
        order = np.argsort(np.frombuffer(keys, dtype=np.int64), kind="stable").tolist()
    del keys
    with open(path, "rb", buffering=BUFFER) as f:
        for n in order:
            if f.tell() != offs[n]:
                f.seek(offs[n])
            r = json.loads(f.readline())
            check_row(r, path, n + 1)
            yield r


def open_rgb(path: str | os.PathLike):
    """The image at `path` as RGB, or DatasetError naming the file (PIL's own errors often do not)."""
    from PIL import Image  # heavy

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"{path}: cannot read the image ({exc}); rerun the command that wrote the dataset "
                           "to redo it, or remove its line from metadata.jsonl") from exc


def iter_images(root: str | os.PathLike, rows: list[dict] | None = None) -> Iterator[tuple[dict, Any]]:
    root = Path(root)
    for r in rows if rows is not None else read_metadata(root):
        yield r, open_rgb(root / r["file_name"])
