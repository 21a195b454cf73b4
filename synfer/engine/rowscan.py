"""Streaming reads of metadata files, for run folders of millions of rows (issue 46).

A row is read as bytes and only what the bookkeeping needs is taken from it: its `index` and
`file_name`, from the line's head when synfer wrote it (`{"file_name": ..., "index": N, ...}`),
else from the parsed JSON. So a resume holds one bit per sample (`DoneIndex`), a merge 12 bytes
per sample (where its line is), and readers parse one row at a time (`Rows`).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence, Set
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

# The head of a line synfer wrote: the two keys DatasetWriter puts first; anything else is parsed.
_HEAD = re.compile(rb'\{"file_name": "([^"\\]*)", "index": (\d+)[,}]')
BUFFER = 1 << 20


class DoneIndex(Set):
    """A set of non-negative sample indices stored as a bitmap: 1.4M samples take 175 KB, where a Python set
    takes ~100 MB. Compares equal to a set of the same indices; iterates in increasing order."""

    __hash__ = None  # mutable

    def __init__(self, indices: Iterable[int] = ()):
        self._bits = bytearray()
        self._n = 0
        self.update(indices)

    def add(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"a sample index is a non-negative int, got {index!r}")
        byte, mask = index >> 3, 1 << (index & 7)
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits))))  # doubling: amortised O(1)
        if not self._bits[byte] & mask:
            self._bits[byte] |= mask
            self._n += 1

    def update(self, indices: Iterable[int]) -> None:
        for i in indices:
            self.add(i)

    def __contains__(self, index) -> bool:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0 or index >> 3 >= len(self._bits):
            return False
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[int]:
        bits = self._bits
        for byte in range(len(bits)):
            if v := bits[byte]:
                base = byte << 3
                for k in range(8):
                    if v >> k & 1:
                        yield base + k

    def __repr__(self) -> str:
        return f"DoneIndex({len(self)} indices, {self.nbytes} bytes)"

    @property
    def nbytes(self) -> int:
        """Bytes held for the bitmap (what grows with the rows on disk)."""
        return len(self._bits)


def _index_of(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class LineScan:
    """The complete rows of one metadata file as (byte offset, line, index, file_name), in file order; blank
    lines skipped. Stops at a torn last line (no newline) or a line that is not a JSON object: `good` is then the
    byte length of what came before, `rows` the number of rows yielded. `index` is None for a row without a
    non-negative int `index`; `file_name` None where the row has none."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.good = 0
        self.rows = 0
        self.blank = False  # a blank line was skipped

    def __iter__(self) -> Iterator[tuple[int, bytes, int | None, str | None]]:
        if not self.path.exists():
            return
        pos = 0
        with open(self.path, "rb", buffering=BUFFER) as f:
            for line in f:
                if not line.endswith(b"\n"):
                    return
                if not line.strip():
                    self.blank = True
                    pos += len(line)
                    self.good = pos
                    continue
                m = _HEAD.match(line)
                if m is not None and line.endswith(b"}\n"):
                    item = (pos, line, int(m[2]), m[1].decode())
                else:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        return
                    if not isinstance(r, dict):
                        return
                    name = r.get("file_name")
                    item = (pos, line, _index_of(r.get("index")), name if isinstance(name, str) else None)
                pos += len(line)
                self.good = pos
                self.rows += 1
                yield item


def image_exists(root: str, name: str | None) -> bool:
    return name is not None and os.path.exists(os.path.join(root, name))


class Rows(Sequence):
    """The rows of one whole metadata file, parsed as they are iterated (never all held): what `merge` returns.
    `len()` and `bool()` are free, `rows[i]` reads up to row i; compares equal to a list of the same rows."""

    def __init__(self, path: str | os.PathLike, count: int):
        self.path, self.count = Path(path), count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict]:
        if not self.count:
            return
        with open(self.path, "rb", buffering=BUFFER) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.count))] if (i.step or 1) < 0 else \
                list(islice(self, *i.indices(self.count)))
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(i)
        return next(islice(self, i, None))

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, Rows)) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"Rows({self.path}, {self.count} rows)"
