"""FEText sources that read real FER datasets from disk (paper 4.2.1), each in its own layout.

Every source maps the dataset's own labels to canonical expression names and keeps only
those in its `label_space` (synfer.labels). A corrupt, unreadable or missing image is
never a crash: its path goes to `source.skipped` and the stream moves on. Rows that are
valid but carry no usable label (AffectNet's none/uncertain/non-face, a class outside the
label space) are counted in `source.filtered` (reason -> count).

Records come in a fixed order (sorted file lists, file order for CSVs), so a record's
position in the stream is stable and `synfer fetext build` can resume by index.
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field, field_validator

from synfer import hookimpl
from synfer import labels as L
from synfer.stages import FaceRecord, Source, StageConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_image(path: Path, max_pixels: int | None = None):
    """(RGB PIL image, None), or (None, why) when the file is missing, truncated, not an image or
    larger than `max_pixels` (checked from the header, before any pixel is decoded). Grey,
    palette, CMYK and alpha images come back as RGB."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                return None, f"too large: {w}x{h} > max_pixels {max_pixels}"
            im.load()  # decode now: a truncated file fails here, not later in the upscaler
            return im.convert("RGB"), None
    except FileNotFoundError:
        return None, "missing"
    except Image.DecompressionBombError as exc:
        return None, f"too large ({exc})"
    except (OSError, ValueError, SyntaxError) as exc:
        return None, f"unreadable: {exc}"


class DatasetSourceConfig(StageConfig):
    root: str  # the dataset folder
    label_space: str = "affectnet8"  # keep only classes of this space (synfer.labels.LABEL_SPACES)
    limit: int | None = Field(None, gt=0)  # stop after this many records
    tag: str | None = None  # `source` written into the metadata; default: the plugin name
    max_pixels: int = Field(40_000_000, gt=0)  # bigger images are skipped unread (a 40 MP face crop is already absurd)

    @field_validator("label_space")
    @classmethod
    def _known_space(cls, v):
        L.label_space(v)
        return v


class _DatasetSource(Source):
    """Bookkeeping shared by the readers below: skipped files, filtered rows, limit."""

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
        image, why = load_image(path, self.config.max_pixels)
        if image is None:
            self.skipped.append(f"{path} ({why})")
        return image

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


# ---------------------------------------------------------------- ImageFolder


class ImageFolderConfig(DatasetSourceConfig):
    classes: dict[str, str] = {}  # folder name -> expression, for folders canonical() cannot read
    ignore_unknown: bool = False  # skip folders with unknown names instead of failing
    # Unaligned photos: true (RetinaFace) or a face_detector block with optional size/zoom; each image becomes
    # its largest face, aligned (synfer.align; default 256 px at zoom 0.8, forehead to chin); no face: skipped.
    align: bool | dict = False

    @field_validator("align")
    @classmethod
    def _align(cls, v):
        from synfer.align import align_block

        align_block(v)  # says what a valid setting looks like
        return v


class ImageFolderSource(_DatasetSource):
    """`root/<class>/<image>`: folder names like 'Happy', 'angry', 'Surprised' or label-space indices '0'..'7'."""

    name = "imagefolder"
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
        folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: (p.name.lower(), p.name))
        mapped = {f: self._expression(f.name) for f in folders}
        unknown = [f.name for f, e in mapped.items() if e is None]
        if unknown and not self.config.ignore_unknown:
            raise ValueError(f"imagefolder source: cannot read the class of folder(s) {unknown} under {root}; "
                             f"name them after an expression ({', '.join(L.EXPRESSIONS)}), map them with "
                             f"`classes: {{{unknown[0]}: happy}}`, or set `ignore_unknown: true`")
        aligner = None
        if self.config.align:
            from synfer.align import aligner_for

            aligner = aligner_for(self.config.align, size=256, zoom=0.8)
        for folder, expression in mapped.items():
            if expression is None:
                continue
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            for path in files:
                if not self._keep(expression):
                    continue
                image = self._load(path)
                if image is not None and aligner is not None:
                    image = aligner.crops([image])[0]
                    if image is None:
                        self.skipped.append(f"{path} (no face found)")
                if image is None:
                    continue
                yield FaceRecord(image=image, expression=expression, source=self.tag,
                                 attributes={"file": str(path.relative_to(root))})


# ---------------------------------------------------------------- AffectNet


class AffectNetConfig(DatasetSourceConfig):
    csv: str = "training.csv"  # relative to root, or absolute (validation.csv for the val split)
    images: str = "Manually_Annotated_Images"  # folder holding subDirectory_filePath, relative to root
    crop_face: bool = True  # crop to face_x, face_y, face_width, face_height


class AffectNetSource(_DatasetSource):
    """AffectNet's CSV: subDirectory_filePath, face box, landmarks, expression 0..10, valence, arousal."""

    name = "affectnet-csv"
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
        with open(table, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    code = int(row["expression"])
                except (KeyError, TypeError, ValueError):
                    self.skipped.append(f"{table.name}:{row.get('subDirectory_filePath', '?')} (bad expression)")
                    continue
                if code in self.NOT_A_CLASS or not 0 <= code < len(classes):
                    self.filtered[self.NOT_A_CLASS.get(code, f"expression {code}")] += 1
                    continue
                expression = classes[code]
                if not self._keep(expression):
                    continue
                path = images / row["subDirectory_filePath"]
                image = self._load(path)
                if image is None:
                    continue
                if self.config.crop_face:
                    image = self._crop(image, row)
                yield FaceRecord(image=image, expression=expression, source=self.tag,
                                 attributes={"file": row["subDirectory_filePath"],
                                             "valence": _float(row.get("valence")), "arousal": _float(row.get("arousal"))})

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


class RafDBSource(_DatasetSource):
    """RAF-DB basic: `EmoLabel/list_patition_label.txt` lines 'train_00001.jpg 5', labels 1..7."""

    name = "rafdb"
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
        for line_no, line in enumerate(self._label_file(root).read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(classes):
                self.skipped.append(f"{self.LABEL_FILE}:{line_no} (malformed line {line!r})")
                continue
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


# ---------------------------------------------------------------- FER2013


class Fer2013Config(DatasetSourceConfig):
    root: str  # the folder holding the CSV (or the CSV itself)
    label_space: str = "fer2013"
    csv: str = "fer2013.csv"
    split: Literal["train", "val", "test", "all"] = "train"  # Training, PublicTest, PrivateTest


class Fer2013Source(_DatasetSource):
    """FER2013's single CSV: emotion (0..6), pixels (48*48 grey values), Usage."""

    name = "fer2013-csv"
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
        with open(table, newline="") as f:
            for row_no, row in enumerate(csv.DictReader(f), 2):  # row 1 is the header
                if usage is not None and row.get("Usage", "").strip() != usage:
                    continue
                where = f"{table.name}:row {row_no}"
                try:
                    expression = classes[int(row["emotion"])]
                    pixels = np.array(row["pixels"].split(), dtype=np.uint8)
                    image = Image.fromarray(pixels.reshape(self.SIDE, self.SIDE)).convert("RGB")
                except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError):
                    self.skipped.append(where)
                    continue
                if not self._keep(expression):
                    continue
                yield FaceRecord(image=image, expression=expression, source=self.tag,
                                 attributes={"file": where, "usage": row.get("Usage")})


@hookimpl
def register_stages(register):
    for cls in (ImageFolderSource, AffectNetSource, RafDBSource, Fer2013Source):
        register(cls)
