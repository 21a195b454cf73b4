"""The rows of the on-disk format (synfer.engine.dataset): file names, what a `metadata.jsonl` row holds and how it is
checked, and the errors a reader raises. Imports nothing of synfer above it."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from synfer.contract import labels as L

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


_FIELDS = tuple(DatasetRow.model_fields)


def check_row(row: dict, path: Path | str, n: int) -> None:
    """Row `n` of `path` against `DatasetRow` (its own fields only); DatasetError with the line number and what is wrong."""
    try:
        DatasetRow.model_validate({k: row[k] for k in _FIELDS if k in row})
    except ValidationError as exc:
        what = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise DatasetError(f"{path}: row {n} is not a synfer dataset row ({what}); expected at least "
                           "file_name (and label/expression for labelled sets)") from None


def parse_rows(rows: list[dict], path: Path | str = METADATA) -> list[dict]:
    """Check every row against `DatasetRow`; a bad row fails with its line number and what is wrong."""
    for n, r in enumerate(rows, 1):
        check_row(r, path, n)
    return rows


def not_a_dataset(root: Path) -> DatasetError:
    return DatasetError(f"{root} is not a synfer dataset: no {METADATA}. Build one with 'synfer run' or 'synfer fetext build'.")


def torn(path: Path, line: int) -> DatasetError:
    """A metadata file whose line `line` is cut off or not JSON: reading on would silently drop rows."""
    return DatasetError(f"{path}: line {line} is cut off or not JSON (a write was interrupted?); rerun the command "
                        "that wrote the dataset (it repairs the file and redoes that sample) or delete that line")


def image_name(index: int, ext: str = "png", images_per_folder: int | None = None) -> str:
    """The `file_name` of sample `index`: `images/00012345.png`, or with `images_per_folder` N the same name in
    sub-folder `index // N` (`images/00012/00012345.png` for N = 1000), so no folder holds more than N images."""
    if images_per_folder is None:
        return f"{IMAGES}/{index:08d}.{ext}"
    if isinstance(images_per_folder, bool) or not isinstance(images_per_folder, int) or images_per_folder < 1:
        raise ValueError(f"images_per_folder must be an int >= 1 (or None for one flat images/ folder), got {images_per_folder!r}")
    return f"{IMAGES}/{index // images_per_folder:05d}/{index:08d}.{ext}"
