"""FEText sources that read real FER datasets from disk (paper 4.2.1), each in its own layout.

Every source maps the dataset's own labels to canonical expression names and keeps only
those in its `label_space` (synfer.labels). A corrupt, unreadable or missing image is
never a crash: its path goes to `source.skipped` and the stream moves on. Rows that are
valid but carry no usable label (AffectNet's none/uncertain/non-face, a class outside the
label space) are counted in `source.filtered` (reason -> count).

Records come in a fixed order (sorted file lists, file order for CSVs), and every record names
its file (or CSV row) in `attributes["file"]`: `synfer fetext build` keys records by source tag
and file, so a resume after the dataset changed never duplicates or drops one.
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Iterator, Literal

from pydantic import field_validator

from synfer import hookimpl
from synfer import labels as L
from synfer.stages import FaceRecord
from synfer_plugins.source_files import (  # noqa: F401 (re-exported)
    IMAGE_EXTENSIONS, DatasetSource, DatasetSourceConfig, SourceSchemaError, load_image, open_table, to_rgb8)

# ---------------------------------------------------------------- ImageFolder


class ImageFolderConfig(DatasetSourceConfig):
    classes: dict[str, str] = {}  # folder name -> expression, for folders canonical() cannot read
    ignore_unknown: bool = False  # skip folders with unknown names instead of failing
    unlabelled: bool = False  # keep photos with no class (loose files at the root, metadata rows without a label): expression null
    # Unaligned photos: true (RetinaFace) or a face_detector block with optional size/zoom; each image becomes
    # its largest face, aligned (synfer.engine.align; default 256 px at zoom 0.8, forehead to chin); no face: skipped.
    align: bool | dict = False

    @field_validator("align")
    @classmethod
    def _align(cls, v):
        from synfer.engine.align import align_block

        align_block(v)  # says what a valid setting looks like
        return v


class ImageFolderSource(DatasetSource):
    """`root/<class>/<image>` (folder names like 'Happy', 'angry', 'Surprised' or label-space indices '0'..'7'), or a
    folder with a `metadata.jsonl` (datasets' imagefolder: `file_name` plus `label`/`expression`), such as what
    `synfer label` writes; loose photos at the root are unlabelled (`unlabelled: true`)."""

    name = "imagefolder"
    licence = "MIT (code; the faces keep their owners' terms, declared in the folder's README.md)"
    Config = ImageFolderConfig

    def _expression(self, folder: str) -> str | None:
        if folder in self.config.classes:
            return L.canonical(self.config.classes[folder])
        if folder.isdigit() and int(folder) < len(self._space):
            return self._space[int(folder)]
        try:
            return L.canonical(folder)
        except ValueError:
            return None

    def _stream(self) -> Iterator[FaceRecord]:
        root = self._root()
        aligner = None
        if self.config.align:
            from synfer.engine.align import aligner_for

            aligner = aligner_for(self.config.align, size=256, zoom=0.8)
        if (root / "metadata.jsonl").is_file():
            yield from self._rows(root, aligner)
            return
        folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: (p.name.lower(), p.name))
        loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        mapped = {f: self._expression(f.name) for f in folders}
        unknown = [f.name for f, e in mapped.items() if e is None]
        if loose and not self.config.unlabelled:
            if not folders:
                raise ValueError(
                    f"imagefolder source: {len(loose)} loose image(s) at the root of {root} (e.g. {loose[0].name}) and no class "
                    "folders; imagefolder wants root/<class>/<image> (e.g. root/happy/1.jpg). For unlabelled photos: label them "
                    f"with 'synfer label {root} --recipe recipes/label-photos.yaml output=LABELLED' and use LABELLED as the root "
                    "(its metadata.jsonl gives the labels), or set `unlabelled: true` to keep them without a label")
            self.filtered["loose file at the root, not in a class folder (unlabelled: true keeps it)"] += len(loose)
        if unknown and not self.config.ignore_unknown:
            raise ValueError(f"imagefolder source: cannot read the class of folder(s) {unknown} under {root}; "
                             f"name them after an expression ({', '.join(L.EXPRESSIONS)}), map them with "
                             f"`classes: {{{unknown[0]}: happy}}`, or set `ignore_unknown: true`")
        items = [(path, expression) for folder, expression in mapped.items() if expression is not None
                 for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)]
        if self.config.unlabelled:
            items += [(path, None) for path in loose]
        for path, expression in items:
            if expression is not None and not self._keep(expression):
                continue
            record = self._record(root, path, expression, aligner)
            if record is not None:
                yield record

    def _record(self, root: Path, path: Path, expression: str | None, aligner, aus=None) -> FaceRecord | None:
        image = self._load(path)
        if image is not None and aligner is not None:
            image = aligner.crops([image])[0]
            if image is None:
                self.skipped.append(f"{path} (no face found)")
        if image is None:
            return None
        return FaceRecord(image=image, expression=expression, aus=aus, source=self.tag, attributes={"file": str(path.relative_to(root))})

    def _rows(self, root: Path, aligner) -> Iterator[FaceRecord]:
        """A labelled folder's rows: `label` as a class name or an index into `label_space`, else `expression`; rows a
        vote did not keep (`kept: false`) are left out; AUs already annotated come along."""
        from synfer.engine.dataset import read_metadata

        for row in read_metadata(root, verify=False):
            if row.get("kept") is False:
                self.filtered["not kept by the vote (kept: false)"] += 1
                continue
            # a class name first (`label` of generated and labelled sets, `expression` of FEText), else an index
            label = next((v for v in (row.get("label"), row.get("expression")) if isinstance(v, str) and v), row.get("label"))
            if isinstance(label, int) and not isinstance(label, bool):
                label = self._space[label] if 0 <= label < len(self._space) else None
            expression = L.canonical(label) if isinstance(label, str) and label else None
            if expression is None and not self.config.unlabelled:
                self.filtered["row without a label (unlabelled: true keeps it)"] += 1
                continue
            if expression is not None and not self._keep(expression):
                continue
            record = self._record(root, root / row["file_name"], expression, aligner, row.get("aus"))
            if record is not None:
                yield record


# ---------------------------------------------------------------- AffectNet


class AffectNetConfig(DatasetSourceConfig):
    csv: str = "training.csv"  # relative to root, or absolute (validation.csv for the val split)
    images: str = "Manually_Annotated_Images"  # folder holding subDirectory_filePath, relative to root
    crop_face: bool = True  # crop to face_x, face_y, face_width, face_height


class AffectNetSource(DatasetSource):
    """AffectNet's CSV: subDirectory_filePath, face box, landmarks, expression 0..10, valence, arousal."""

    name = "affectnet-csv"
    licence = "MIT (code)"
    data_terms = "AffectNet licence agreement: academic research only, non-commercial"
    Config = AffectNetConfig
    # 0..7 are AffectNet's classes in its own order; 8, 9, 10 = none, uncertain, non-face.
    NOT_A_CLASS = {8: "none", 9: "uncertain", 10: "non-face"}

    def _stream(self) -> Iterator[FaceRecord]:
        root = self._root()
        table = Path(self.config.csv)
        table = table if table.is_absolute() else root / table
        images = root / self.config.images
        images = images if images.is_dir() else root
        classes = L.LABEL_SPACES["affectnet8"]
        required = ["subDirectory_filePath", "expression"] + (["face_x", "face_y", "face_width", "face_height"] if self.config.crop_face else [])
        f, reader = open_table(table, self.name, required,
                               "AffectNet's CSV with columns subDirectory_filePath, face_x, face_y, face_width, face_height, "
                               "facial_landmarks, expression, valence, arousal (set crop_face: false when there is no face box)")
        with f:
            for row_no, row in enumerate(reader, 2):  # row 1 is the header
                file = (row.get("subDirectory_filePath") or "").strip()
                where = f"{table.name}:row {row_no}"
                try:
                    code = int(row["expression"])
                except (KeyError, TypeError, ValueError):
                    self.skipped.append(f"{where} {file or '?'} (bad expression: {row.get('expression')!r}, expected 0..10)")
                    continue
                if not 0 <= code <= 10:
                    self.skipped.append(f"{where} {file} (bad expression: {code}, expected 0..10)")
                    continue
                if code in self.NOT_A_CLASS:
                    self.filtered[self.NOT_A_CLASS[code]] += 1
                    continue
                if not file:
                    self.skipped.append(f"{where} (no subDirectory_filePath)")
                    continue
                expression = classes[code]
                if not self._keep(expression):
                    continue
                image = self._load(images / file)
                if image is None:
                    continue
                if self.config.crop_face:
                    image = self._crop(image, row)
                if not self._big_enough(image, f"{images / file} face box"):
                    continue
                yield FaceRecord(image=image, expression=expression, source=self.tag,
                                 attributes={"file": file, "valence": _float(row.get("valence")), "arousal": _float(row.get("arousal"))})

    @staticmethod
    def _crop(image, row):
        try:
            x, y, w, h = (int(float(row[k])) for k in ("face_x", "face_y", "face_width", "face_height"))
        except (KeyError, TypeError, ValueError):
            return image
        if w <= 0 or h <= 0:
            return image
        box = (max(x, 0), max(y, 0), min(x + w, image.width), min(y + h, image.height))
        return image.crop(box) if box[2] > box[0] and box[3] > box[1] else image


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- RAF-DB


class RafDBConfig(DatasetSourceConfig):
    label_space: str = "rafdb7"
    split: Literal["train", "test", "all"] = "train"
    aligned: bool = True  # Image/aligned/<name>_aligned.jpg; false: Image/original/<name>.jpg


class RafDBSource(DatasetSource):
    """RAF-DB basic: `EmoLabel/list_patition_label.txt` lines 'train_00001.jpg 5', labels 1..7."""

    name = "rafdb"
    licence = "MIT (code)"
    data_terms = "RAF-DB release agreement: non-commercial research only"
    Config = RafDBConfig
    LABEL_FILE = "list_patition_label.txt"  # sic: the dataset's own spelling

    def _label_file(self, root: Path) -> Path:
        for candidate in (root / "EmoLabel" / self.LABEL_FILE, root / self.LABEL_FILE):
            if candidate.exists():
                return candidate
        raise FileNotFoundError(f"rafdb source: no {self.LABEL_FILE} in {root}/EmoLabel or {root}; "
                                "point `root:` at RAF-DB's `basic` folder")

    def _stream(self) -> Iterator[FaceRecord]:
        root = self._root()
        classes = L.LABEL_SPACES["rafdb7"]
        label_file = self._label_file(root)
        try:
            lines = label_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise SourceSchemaError(f"rafdb source: {label_file} is not a text file; expected lines '<name>.jpg <label 1..7>'") from None
        good = 0
        for line_no, line in enumerate(lines, 1):
            parts = line.split()
            if not parts:
                continue
            if (len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(classes)
                    or "." not in parts[0].strip(".")):
                self.skipped.append(f"{label_file.name}:{line_no} (malformed line: {line.strip()!r}, expected '<name>.jpg <label 1..7>')")
                continue
            good += 1
            name, label = parts[0], int(parts[1])
            if self.config.split != "all" and not name.startswith(self.config.split + "_"):
                continue
            expression = classes[label - 1]
            if not self._keep(expression):
                continue
            stem, ext = name.rsplit(".", 1)
            path = (root / "Image" / "aligned" / f"{stem}_aligned.{ext}" if self.config.aligned
                    else root / "Image" / "original" / name)
            image = self._load(path)
            if image is None:
                continue
            yield FaceRecord(image=image, expression=expression, source=self.tag, attributes={"file": name})
        if not good:
            first = next((x.strip() for x in lines if x.strip()), None)
            raise SourceSchemaError(f"rafdb source: {label_file} has no usable line ("
                                    + (f"the first is {first[:80]!r}" if first else "it is empty")
                                    + "); expected lines '<name>.jpg <label 1..7>' like 'train_00001.jpg 5'")


# ---------------------------------------------------------------- FER2013


class Fer2013Config(DatasetSourceConfig):
    root: str  # the folder holding the CSV (or the CSV itself)
    label_space: str = "fer2013"
    csv: str = "fer2013.csv"
    split: Literal["train", "val", "test", "all"] = "train"  # Training, PublicTest, PrivateTest


class Fer2013Source(DatasetSource):
    """FER2013's single CSV: emotion (0..6), pixels (48*48 grey values), Usage."""

    name = "fer2013-csv"
    licence = "MIT (code; FER2013's own terms are not declared here: check those of your copy)"
    Config = Fer2013Config
    USAGE = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}
    SIDE = 48

    def _stream(self) -> Iterator[FaceRecord]:
        import numpy as np
        from PIL import Image

        root = self._root()
        table = root if root.is_file() else root / self.config.csv
        classes = L.LABEL_SPACES["fer2013"]
        usage = self.USAGE.get(self.config.split)
        expected = ("FER2013's CSV with the header 'emotion,pixels,Usage' (Usage is needed for split: "
                    f"{self.config.split}; split: all reads every row)")
        f, reader = open_table(table, self.name, ["emotion", "pixels"] + (["Usage"] if usage else []), expected)
        rows = 0
        usages: Counter = Counter()
        side = self.SIDE
        with f:
            for row_no, row in enumerate(reader, 2):  # row 1 is the header
                rows += 1
                where = f"{table.name}:row {row_no}"
                if usage is not None:
                    u = (row.get("Usage") or "").strip()
                    usages[u] += 1
                    if u != usage:
                        continue
                try:
                    code = int(row["emotion"])
                except (KeyError, TypeError, ValueError):
                    self.skipped.append(f"{where} (bad emotion: {row.get('emotion')!r}, expected 0..{len(classes) - 1})")
                    continue
                if not 0 <= code < len(classes):  # -1 would index from the end: a wrong label, silently
                    self.skipped.append(f"{where} (bad emotion: {code}, expected 0..{len(classes) - 1})")
                    continue
                try:
                    pixels = np.array((row.get("pixels") or "").split(), dtype=np.int64)
                except ValueError:
                    self.skipped.append(f"{where} (bad pixels: not integers)")
                    continue
                if pixels.size != side * side or pixels.min() < 0 or pixels.max() > 255:
                    why = f"{pixels.size} values, expected {side * side}" if pixels.size != side * side else "values outside 0..255"
                    self.skipped.append(f"{where} (bad pixels: {why})")
                    continue
                expression = classes[code]
                if not self._keep(expression):
                    continue
                image = Image.fromarray(pixels.astype(np.uint8).reshape(side, side)).convert("RGB")
                if not self._big_enough(image, where):
                    continue
                yield FaceRecord(image=image, expression=expression, source=self.tag,
                                 attributes={"file": where, "usage": row.get("Usage")})
        if not rows:
            raise SourceSchemaError(f"fer2013-csv source: {table} has a header but no rows; expected {expected}")
        if usage is not None and not usages.get(usage):
            found = ", ".join(f"{k or '(empty)'} {v}" for k, v in usages.most_common(5))
            raise SourceSchemaError(f"fer2013-csv source: no row of {table} has Usage {usage!r} (split: {self.config.split}); "
                                    f"found {found}; set split: to one of train, val, test or all")


@hookimpl
def register_stages(register):
    for cls in (ImageFolderSource, AffectNetSource, RafDBSource, Fer2013Source):
        register(cls)
