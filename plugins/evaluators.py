"""Evaluators of a generated dataset (paper 5.1): FID, FER accuracy, AU F1, diversity, label quality.

Each evaluator prints and returns named numbers. The scoring itself lives in the pure
functions of `synfer.engine.scoring` (re-exported here), tested on hand-made inputs.

Judges are plugins: the FER judge is any guidance_classifier or expert (default `oracle-cnn`,
the independent judge of the procedural world), the AU judge any AU detector (default
`au-cnn`). A judge block is a plugin name or a mapping `{plugin: name, ...its config}`.

Features for FID and diversity come from a pluggable extractor: by default the penultimate
features of `oracle-cnn` (offline; an FID on them is NOT comparable to a published
Inception FID, and the printed line says so), `inception` with a local TorchScript
Inception-v3 file, or `pixels`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from synfer import hookimpl
from synfer import labels as L
from synfer.engine.dataset import row_label
from synfer.engine.scoring import au_f1_scores, fer_accuracy_scores, frechet_distance, label_quality_scores, mean_pairwise_distance
from synfer.stages import Evaluator, StageConfig, missing_path

__all__ = ["au_f1_scores", "fer_accuracy_scores", "frechet_distance", "label_quality_scores", "mean_pairwise_distance"]  # re-exported

JudgeBlock = str | dict[str, Any]


# ---------------------------------------------------------------- data and judges


def dataset_rows(root: str | Path, kept_only: bool = True, max_images: int | None = None) -> list[dict]:
    """Rows of a synfer dataset, or of a bare image folder (rows with only `file_name`); the first `max_images`
    are read and no more (a million-row dataset is not held for a 2000-image FID)."""
    from itertools import islice

    rows = iter_dataset_rows(root, kept_only)
    return list(islice(rows, max_images) if max_images else rows)


def iter_dataset_rows(root: str | Path, kept_only: bool = True):
    """`dataset_rows`, one row at a time (synfer.engine.dataset.iter_metadata: index order, every file checked first)."""
    from synfer.engine.dataset import METADATA, iter_metadata

    root = Path(root)
    if (root / METADATA).exists():
        rows = iter_metadata(root)
        yield from (r for r in rows if r.get("kept", True)) if kept_only else rows
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        yield from ({"file_name": str(p.relative_to(root))} for p in files)
    else:
        raise FileNotFoundError(f"{root} is neither a synfer dataset (images/ + metadata.jsonl) nor an image folder")


def load_images(root: str | Path, rows: list[dict]):
    from synfer.engine.dataset import open_rgb

    return [open_rgb(Path(root) / r["file_name"]) for r in rows]  # an unreadable image is an error naming its file


def judge_problems(block: JudgeBlock, kinds: tuple[str, ...], field: str = "judge") -> list[str]:
    """`synfer validate` lines for a judge block, checked as its plugin's own block (a missing weights file, a
    judge not fetched yet), so a run never learns after generating that its judge cannot load."""
    from synfer.engine.registry import get_registry
    from synfer.engine.registry import block_problems

    reg = get_registry()
    block = {"plugin": block} if isinstance(block, str) else dict(block)
    align = block.pop("align", None)
    kind = next((k for k in kinds if (k, block.get("plugin")) in reg.plugins), kinds[0])
    out = block_problems(kind, block, field, reg)
    if align:
        from synfer.engine.align import align_problems

        out += align_problems(align, f"{field}.align", reg)
    return out


def build_plugin(block: JudgeBlock, kinds: tuple[str, ...], device: str | None):
    """A plugin named by `block` among `kinds`; `device` fills in the plugin's own `device` field."""
    from synfer.engine.registry import get_registry

    reg = get_registry()
    block = {"plugin": block} if isinstance(block, str) else dict(block)
    align = block.pop("align", None)  # FER judges may detect and align faces first, as experts may (synfer.engine.align)
    kind = next((k for k in kinds if (k, block["plugin"]) in reg.plugins), kinds[0])
    cls = reg.get(kind, block["plugin"])  # teaching error naming what is installed
    if device and "device" in cls.Config.model_fields and "device" not in block:
        block["device"] = device
    plugin = reg.build(kind, block)
    if align and kind != "au_detector":
        from synfer.engine.align import aligned_predict

        plugin.predict = aligned_predict(plugin.predict, align, reg)
    return plugin


def judge_labels(judge, images, batch_size: int = 256) -> list[str]:
    """Class names the judge picks (argmax), canonical."""
    import numpy as np

    probs = np.concatenate([judge.predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    classes = L.label_space(judge.label_space)  # read after predict: tiny-cnn learns its space when it loads
    return [classes[i] for i in probs.argmax(1)]


def resize_clean(images, size: int):
    """PIL images -> float32 (N, size, size, 3) in [0, 255], resized per channel in float with
    bicubic filtering (clean-fid's rule: no uint8 quantisation after resizing)."""
    import numpy as np
    from PIL import Image

    out = np.empty((len(images), size, size, 3), np.float32)
    for n, im in enumerate(images):
        arr = np.asarray(im.convert("RGB"), np.float32)
        if im.size == (size, size):
            out[n] = arr
            continue
        for c in range(3):
            ch = Image.fromarray(arr[..., c], mode="F").resize((size, size), Image.BICUBIC)
            out[n, ..., c] = np.asarray(ch)
    return out


class FeatureExtractor:
    """Images -> (N, D) features: `oracle` (a plugin's `.features()`, default oracle-cnn),
    `inception` (a local TorchScript Inception-v3), or `pixels`."""

    def __init__(self, kind: str, judge: JudgeBlock, path: str | None, size: int, device: str, batch_size: int = 128):
        self.kind, self.judge_block, self.path, self.size, self.device, self.batch_size = kind, judge, path, size, device, batch_size
        self._model = None

    @property
    def description(self) -> str:
        if self.kind == "oracle":
            name = self.judge_block if isinstance(self.judge_block, str) else self.judge_block["plugin"]
            return f"penultimate features of {name} (offline stand-in, not comparable with Inception FID)"
        if self.kind == "inception":
            return f"Inception-v3 TorchScript {self.path}"
        return f"raw pixels at {self.size}x{self.size}"

    def __call__(self, images):
        import numpy as np
        import torch

        if self.kind == "pixels":
            return resize_clean(images, self.size).reshape(len(images), -1) / 255.0
        if self._model is None:
            if self.kind == "oracle":
                self._model = build_plugin(self.judge_block, ("guidance_classifier", "expert"), self.device)
                if not hasattr(self._model, "features"):
                    raise TypeError(f"{type(self._model).__name__} has no features() method; pick a judge with one (oracle-cnn, tiny-cnn)")
            else:
                if not self.path or not Path(self.path).exists():
                    raise FileNotFoundError(f"extractor 'inception' needs a local TorchScript (.pt) or torch.export (.pt2) file "
                                            f"mapping (N, 3, S, S) RGB in [0, 255] to (N, D) features: extractor_path={self.path!r}")
                if self.path.endswith(".pt2"):
                    self._model = torch.export.load(self.path).module().to(self.device)
                else:
                    self._model = torch.jit.load(self.path, map_location=self.device).eval()
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            with torch.no_grad():
                if self.kind == "oracle":  # the plugin resizes itself; its input is RGB in [-1, 1]
                    x = torch.from_numpy(resize_clean(chunk, chunk[0].size[0])).permute(0, 3, 1, 2) / 127.5 - 1.0
                    f = self._model.features(x.to(self.device))
                else:  # TorchScript Inception (clean-fid / StyleGAN convention): float RGB in [0, 255] at 299x299
                    x = torch.from_numpy(resize_clean(chunk, self.size)).permute(0, 3, 1, 2).to(self.device)
                    f = self._model(x)
            out.append(f.reshape(len(chunk), -1).float().cpu().numpy())
        return np.concatenate(out)


class _FeatureConfig(StageConfig):
    extractor: Literal["oracle", "inception", "pixels"] = "oracle"
    judge: JudgeBlock = "oracle-cnn"  # the plugin whose .features() the `oracle` extractor uses
    extractor_path: str | None = None  # `inception`: local TorchScript (.pt) / torch.export (.pt2) Inception-v3 -> (N, 2048)
    extractor_size: int = Field(299, gt=0)  # input size of `inception` / `pixels`
    max_images: int | None = Field(2000, gt=1)  # first N images of each set (None = all)
    kept_only: bool = True  # generated sets: only the samples calibration kept
    device: str = "cpu"

    def feature_problems(self) -> list[str]:
        out = judge_problems(self.judge, ("guidance_classifier", "expert")) if self.extractor == "oracle" else []
        if self.extractor == "inception":
            out += missing_path(self, "extractor_path", "a TorchScript (.pt) or torch.export (.pt2) Inception-v3 file",
                                "Point extractor_path at a local copy; nothing is downloaded.") if self.extractor_path else \
                ["extractor_path: the inception extractor needs a local Inception-v3 file; set extractor_path, or use extractor: oracle"]
        return out

    def make_extractor(self) -> FeatureExtractor:
        return FeatureExtractor(self.extractor, self.judge, self.extractor_path, self.extractor_size, self.device)


def _print(name: str, scores: dict[str, float], note: str = "") -> None:
    """One line per evaluator: the headline number first, then the rest."""
    keys = sorted(scores, key=lambda k: (k != name, k))
    print(f"[{name}] " + ", ".join(f"{k}={scores[k]:.4g}" for k in keys) + (f"  ({note})" if note else ""))


# ---------------------------------------------------------------- evaluators


class FID(Evaluator):
    """Fréchet distance between generated and reference images (paper 5.1, Tab. 1)."""

    name = "fid"
    licence = "MIT (synfer's own; measures, never changes an image)"

    class Config(_FeatureConfig):
        reference: str | None = None  # a real dataset folder (or image folder); the CLI's --reference wins

    @classmethod
    def problems(cls, config):
        return missing_path(config, "reference", "a real dataset folder (images/ + metadata.jsonl) or a folder of images",
                            "Build one with 'synfer fetext build' or point reference at your real set.") + config.feature_problems()

    def evaluate(self, dataset, reference=None):
        ref = reference or self.config.reference
        if ref is None:
            raise ValueError("fid needs a reference set: pass --reference REAL_DATASET or set reference: in the evaluator block")
        ext = self.config.make_extractor()
        gen_rows = dataset_rows(dataset, self.config.kept_only, self.config.max_images)
        ref_rows = dataset_rows(ref, True, self.config.max_images)
        if len(gen_rows) < 2 or len(ref_rows) < 2:  # a covariance needs two images: skip with a note, the rest still runs
            print(f"[fid] skipped: FID needs at least 2 images per set, got {len(gen_rows)} generated (kept) and "
                  f"{len(ref_rows)} reference; generate more (num_images=) to get an FID")
            return {"fid_images": float(len(gen_rows)), "fid_reference_images": float(len(ref_rows))}
        fa = ext(load_images(dataset, gen_rows))
        fb = ext(load_images(ref, ref_rows))
        out = {"fid": frechet_distance(fa, fb), "fid_images": float(len(fa)), "fid_reference_images": float(len(fb))}
        _print("fid", out, f"features: {ext.description}")
        return out


class FERAccuracy(Evaluator):
    """An independent judge scores kept images against their final labels (Tab. 1 'FER Acc.')."""

    name = "fer-accuracy"
    licence = "MIT (synfer's own; measures, never changes an image)"

    class Config(StageConfig):
        judge: JudgeBlock = "oracle-cnn"  # any guidance_classifier or expert plugin
        max_images: int | None = Field(None, gt=0)
        device: str = "cpu"

    @classmethod
    def problems(cls, config):
        return judge_problems(config.judge, ("guidance_classifier", "expert"))

    def evaluate(self, dataset, reference=None):
        rows = [r for r in dataset_rows(dataset, True, self.config.max_images) if row_label(r)]
        judge = build_plugin(self.config.judge, ("guidance_classifier", "expert"), self.config.device)
        verdicts = judge_labels(judge, load_images(dataset, rows)) if rows else []
        space = set(L.label_space(judge.label_space)) if rows else set()
        labels = [row_label(r) for r in rows]
        out = fer_accuracy_scores(labels, [v if t in space else None for t, v in zip(labels, verdicts)])
        _print("fer_accuracy", out, f"judge: {judge.name}")
        return out


class AUAccuracy(Evaluator):
    """AU F1 of an AU detector against the AUs each image was asked for (Tab. 1 'FAU Acc.')."""

    name = "au-accuracy"
    licence = "MIT (synfer's own; measures, never changes an image)"

    class Config(StageConfig):
        judge: JudgeBlock = "au-cnn"  # an au_detector plugin (checked as its own block by validate)
        threshold: float = Field(L.AU_ON_THRESHOLD, gt=0, lt=1)  # intensity (0-1 scale) at which an AU counts as on
        kept_only: bool = True
        max_images: int | None = Field(None, gt=0)
        device: str = "cpu"

    @classmethod
    def problems(cls, config):
        return judge_problems(config.judge, ("au_detector",))

    def evaluate(self, dataset, reference=None):
        import numpy as np

        rows = [r for r in dataset_rows(dataset, self.config.kept_only, self.config.max_images) if r.get("aus")]
        detector = build_plugin(self.config.judge, ("au_detector",), self.config.device)
        images = load_images(dataset, rows)
        if hasattr(detector, "predict_images"):
            pred = detector.predict_images(images) if rows else np.zeros((0, len(L.AU_KEYS)))
        else:
            from synfer.stages import FaceRecord

            pred = np.stack([L.au_vector(d) for d in detector.detect([FaceRecord(image=im, expression=None) for im in images])])
        target = np.stack([L.au_vector(r["aus"]) for r in rows]) if rows else np.zeros((0, len(L.AU_KEYS)))
        out = au_f1_scores(target, pred, self.config.threshold)
        out["au_images"] = float(len(rows))
        _print("au_f1", out, f"judge: {detector.name}, on at intensity >= {self.config.threshold}")
        return out


class Diversity(Evaluator):
    """Mean pairwise feature distance within each final class, averaged over classes."""

    name = "diversity"
    licence = "MIT (synfer's own; measures, never changes an image)"

    class Config(_FeatureConfig):
        metric: Literal["cosine", "euclidean"] = "cosine"
        max_per_class: int = Field(200, gt=1)  # pairs grow quadratically

    @classmethod
    def problems(cls, config):
        return config.feature_problems()

    def evaluate(self, dataset, reference=None):
        import numpy as np

        by: dict[str, list[dict]] = {}  # the first max_per_class rows of each class, read in one pass
        for r in iter_dataset_rows(dataset, self.config.kept_only):
            if (c := row_label(r)) and len(got := by.setdefault(c, [])) < self.config.max_per_class:
                got.append(r)
        ext = self.config.make_extractor()
        out = {}
        for c, rs in sorted(by.items()):
            if len(rs) >= 2:
                out[f"diversity_{c}"] = mean_pairwise_distance(ext(load_images(dataset, rs)), self.config.metric)
        out = {"diversity": float(np.mean(list(out.values()))) if out else 0.0, **out}
        _print("diversity", out, f"{self.config.metric} distance on {ext.description}")
        return out


class LabelQuality(Evaluator):
    """Procedural world: the oracle's verdict as ground truth for preassigned vs calibrated labels."""

    name = "label-quality"
    licence = "MIT (synfer's own; measures, never changes an image)"

    class Config(StageConfig):
        judge: JudgeBlock = "oracle-cnn"
        max_images: int | None = Field(None, gt=0)
        device: str = "cpu"

    @classmethod
    def problems(cls, config):
        return judge_problems(config.judge, ("guidance_classifier", "expert"))

    def evaluate(self, dataset, reference=None):
        rows = [r for r in dataset_rows(dataset, False, self.config.max_images) if "preassigned_label" in r and r.get("label")]
        if not rows:
            print(f"[label_quality] {dataset} has no preassigned/final labels (not a generated set): skipped")
            return {}
        judge = build_plugin(self.config.judge, ("guidance_classifier", "expert"), self.config.device)
        verdicts = judge_labels(judge, load_images(dataset, rows))
        out = label_quality_scores(rows, verdicts)
        _print("label_quality", out, f"judge: {judge.name}; kept samples (suffix _all: every sample)")
        return out


EVALUATORS = (FID, FERAccuracy, AUAccuracy, Diversity, LabelQuality)


@hookimpl
def register_stages(register):
    for cls in EVALUATORS:
        register(cls)
