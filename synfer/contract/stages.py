"""Stage contracts: one ABC per stage of the method, and the typed records between them.

A plugin subclasses one of these, sets `name`, nests a strict pydantic `Config`
and implements the abstract methods. Contracts carry no shared logic.
No torch import at module level: `synfer validate` builds Configs from here.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from synfer.contract.faces import DetectedFace, align_face  # noqa: F401 - DetectedFace: part of this module's API

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image


class StageConfig(BaseModel):
    """Base of every stage's nested Config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---------------------------------------------------------------- records


@dataclass
class FaceRecord:
    """One face of FEText (paper 4.2.1): image, expression, AUs, caption and provenance."""

    image: "Image.Image"
    expression: str | None  # canonical name (synfer.contract.labels.EXPRESSIONS) or None if unlabelled
    aus: dict[str, float] | None = None  # AU_KEYS -> intensity in [0, 1]
    caption: str | None = None
    source: str = ""
    identity: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)  # e.g. the procedural identity


@dataclass
class SampleRequest:
    """What the plan asks the generator for, one per sample index."""

    index: int
    seed: int
    expression: str  # canonical name, also the preassigned label
    aus: dict[str, float]
    prompt: str = ""
    layout_source: str | None = None  # file of the FEText face used for layout init
    guided: bool | None = None  # semantic guidance: False when the guidance classifier cannot see the class


@dataclass
class GeneratedSample:
    request: SampleRequest
    image: "Image.Image"
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. guidance settings


@dataclass
class LabelledSample:
    """A generated sample after calibration and voting (paper 4.1, 4.4)."""

    sample: GeneratedSample
    preassigned_label: str
    label: str
    soft_label: list[float]  # over the recipe's label space
    agreement: float  # weighted share of votes for the final label
    kept: bool
    predictions: dict[str, list[float]] = field(default_factory=dict)  # expert name -> probs

    def metadata(self, file_name: str) -> dict[str, Any]:
        r = self.sample.request
        return {
            "file_name": file_name,
            "index": r.index,
            "seed": r.seed,
            "prompt": r.prompt,
            "aus": r.aus,
            "preassigned_label": self.preassigned_label,
            "label": self.label,
            "soft_label": [round(float(p), 5) for p in self.soft_label],
            "agreement": round(float(self.agreement), 5),
            "kept": bool(self.kept),
            "layout_source": r.layout_source,
            **({"guided": False} if r.guided is False else {}),  # the class is outside the guidance classifier's space
            "predictions": {k: [round(float(p), 5) for p in v] for k, v in self.predictions.items()},
            **self.sample.extra,
        }


# ---------------------------------------------------------------- stages


class Stage(abc.ABC):
    """Common shape: a class-level `name`, a nested `Config`, built from a validated config.

    A Config field named `device` that the recipe leaves unset is set by the run to the generator's
    `target_device()` before a guidance classifier, calibrator or expert is used (they run beside the UNet)."""

    kind: ClassVar[str]
    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    # What the core knows of a kind, declared once here: synfer.contract.contracts checks plugins by it, the registry
    # looks plugins up by it, and docs/plugins.md's stage table and registry.yaml are tested against it.
    predicts: ClassVar[bool] = False  # returns class scores, so a plugin must say in which `label_space`
    reserved: ClassVar[tuple[str, ...]] = ("plugin",)  # keys of its recipe block the core reads itself: no Config field
    stands_in: ClassVar[tuple[str, ...]] = ()  # other kinds whose plugins may fill a block of this kind

    def __init__(self, config: StageConfig | None = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def problems(cls, config: StageConfig) -> list[str]:
        """Cheap checks `synfer validate` runs on a valid config (files exist, ...), as
        "field: what is wrong; what to do" lines. No weights are loaded, torch is not imported."""
        return []


def missing_path(config: StageConfig, field: str, expected: str, hint: str) -> list[str]:
    """A problem line when `config.<field>` names a path that does not exist (None is fine: a default)."""
    value = getattr(config, field)
    if value is None or os.path.exists(value):
        return []
    return [f"{field}: {value!r} does not exist; expected {expected}. {hint}"]


class Source(Stage):
    """Where FEText faces come from (procedural world, real dataset layouts)."""

    kind = "source"

    @abc.abstractmethod
    def records(self) -> Iterator[FaceRecord]: ...


class Captioner(Stage):
    """Writes an expression-focused caption for a face (paper 4.2.1)."""

    kind = "captioner"

    @abc.abstractmethod
    def caption(self, records: list[FaceRecord]) -> list[str]: ...


class Prompter(Stage):
    """Enriches a coarse expression request into a detailed prompt (Fig. 2)."""

    kind = "prompter"

    @abc.abstractmethod
    def prompt(self, requests: list[SampleRequest]) -> list[str]: ...


class Upscaler(Stage):
    """Brings FEText sources to one resolution (paper 4.2.1)."""

    kind = "upscaler"

    @abc.abstractmethod
    def upscale(self, images: list["Image.Image"], size: int) -> list["Image.Image"]: ...


class AUDetector(Stage):
    """Annotates facial action units (paper 4.2.1)."""

    kind = "au_detector"

    @abc.abstractmethod
    def detect(self, records: list[FaceRecord]) -> list[dict[str, float] | None]:
        """AU intensities in [0, 1] keyed by synfer.contract.labels.AU_KEYS; None for a face it could not measure (no face
        found), which FEText writes as `aus: null` and counts in its summary, never as all-zero AUs."""


class Generator(Stage):
    """Text + AU conditioned diffusion sampler with layout init and semantic guidance (4.2-4.3)."""

    kind = "generator"
    # Sample indices the run keeps together: torchrun ranks and resumes split the plan in whole chunks
    # [kC, (k+1)C), and each generate() call gets whole chunks (minus samples already on disk). 1: any split.
    chunk: int = 1

    @property
    def batch_size(self) -> int:
        """Samples the engine hands one generate() call, rounded up to whole chunks: the Config's `batch_size`, else 8.
        Never changes the bytes written (the chunk does)."""
        return max(1, int(getattr(self.config, "batch_size", 8) or 8))

    @abc.abstractmethod
    def generate(self, requests: list[SampleRequest], guidance: "GuidanceClassifier | None" = None) -> list[GeneratedSample]: ...

    def target_device(self) -> str:
        """Where this generator runs ("cpu", "cuda:0", ...), known without loading weights. Stages that run a
        network (guidance classifier, calibrator, experts) default to it when their recipe block sets no device."""
        return "cpu"


class DiffusionBackbone(Protocol):
    """What a calibrator may read of a diffusion generator (FERAnno, paper 4.4), e.g. the `sd` generator.

    Images are (N, 3, H, W) in [-1, 1] at `size`; latents are what `unet` takes; `predict_noise` is one
    conditional UNet pass (AUs (N, 16) in [0, 1], ignored without an AU adapter) whose output is of the
    scheduler's `prediction_type`. `encode_text` returns the whole conditioning as one (N, tokens, D) tensor:
    extra conditioning (SDXL's pooled embedding) rides along as trailing tokens that only `predict_noise`
    unpacks, so callers cat, slice and move it as one (docs/plugins.md, Backbones)."""

    size: int
    device: Any
    dtype: Any
    unet: Any
    scheduler: Any
    has_au_adapter: bool

    def encode_image(self, images: "torch.Tensor") -> "torch.Tensor": ...

    def encode_text(self, prompts: list[str]) -> "torch.Tensor": ...

    def predict_noise(self, latents: "torch.Tensor", t: Any, text_emb: "torch.Tensor", aus: "torch.Tensor | None" = None) -> "torch.Tensor": ...


class GuidanceClassifier(Stage):
    """Differentiable FER classifier steering the text embedding (Eq. 4-6).

    `forward` takes RGB float tensors (N, 3, H, W) in [-1, 1] at any size and does its
    own resizing/greying, so gradients flow from logits back to the image.
    """

    kind = "guidance_classifier"
    predicts = True
    reserved = ("plugin", "weight", "align")  # any guidance classifier may vote under `experts:` too
    label_space: ClassVar[str]  # or a property; read before the first forward(), so never set on loading weights

    @abc.abstractmethod
    def forward(self, images: "torch.Tensor") -> "torch.Tensor": ...

    def predict(self, images: list["Image.Image"]) -> "np.ndarray":
        """Probabilities (N, classes) in `label_space`: lets every classifier vote as an expert."""
        import torch  # heavy

        size = images[0].size  # forward() resizes anyway; a common size lets the batch stack
        x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB").resize(size), dtype=np.float32) for im in images]))
        x = x.permute(0, 3, 1, 2) / 127.5 - 1.0
        with torch.no_grad():
            return torch.softmax(self.forward(x), dim=-1).cpu().numpy()


class TrainableClassifier(abc.ABC):
    """Mixed into a classifier stage the core can train from arrays (`synfer benchmark downstream`)."""

    @classmethod
    @abc.abstractmethod
    def fit_arrays(cls, images: "np.ndarray", targets: "np.ndarray", num_classes: int, *, iters: int, batch_size: int, lr: float,
                   seed: int, size: int, width: int, threads: int | None = None) -> "Callable[[np.ndarray], np.ndarray]":
        """Train a fresh model on uint8 images (N, H, W, 3) and targets: class indices (N,), or (N, classes) probabilities
        (the downstream benchmark's `synthetic_targets: soft_label`); -> uint8 images -> logits (N, classes)."""


class Expert(Stage):
    """Any FER classifier voting on generated samples (4.1)."""

    kind = "expert"
    predicts = True
    reserved = ("plugin", "weight", "align")  # the vote weight; face alignment before the expert sees the image
    stands_in = ("guidance_classifier",)
    label_space: ClassVar[str]  # or a property (e.g. read from the weights' config.json); known before predict()
    outputs: ClassVar[str] = "probabilities"  # or "logits": the core applies the softmax

    @abc.abstractmethod
    def predict(self, images: list["Image.Image"]) -> "np.ndarray":
        """Probabilities (N, classes) in `label_space`."""


class Calibrator(Stage):
    """FERAnno, labels from the generator's own features (4.4)."""

    kind = "calibrator"
    predicts = True
    label_space: ClassVar[str]
    outputs: ClassVar[str] = "probabilities"  # or "logits"

    def bind(self, backbone: DiffusionBackbone) -> None:
        """Hand over the generator whose UNet the calibrator reads (a `DiffusionBackbone`); default: unused."""

    @abc.abstractmethod
    def predict(self, samples: list[GeneratedSample]) -> "np.ndarray": ...


class FaceDetector(Stage):
    """Finds faces in real photos (boxes, 5 landmarks, scores) and aligns them for experts and FEText."""

    kind = "face_detector"
    reserved = ("plugin", "size", "zoom")  # an expert's `align:` block: the aligned crop's side and zoom

    @abc.abstractmethod
    def detect(self, images: list["Image.Image"]) -> list[list[DetectedFace]]:
        """Faces per image, best score first (an empty list when there is none)."""

    def align(self, image: "Image.Image", face: DetectedFace, size: int = 224, zoom: float = 1.0) -> "Image.Image":
        """The size x size crop the experts (zoom 1) and FEText (zoom 0.8) expect (synfer.contract.faces.align_face)."""
        return align_face(image, face, size, zoom)


class Evaluator(Stage):
    """Measures a generated dataset (5.1-5.2)."""

    kind = "evaluator"

    @abc.abstractmethod
    def evaluate(self, dataset: Path, reference: Path | None = None) -> dict[str, float]: ...


STAGE_KINDS: dict[str, type[Stage]] = {
    cls.kind: cls
    for cls in (Source, Captioner, Prompter, Upscaler, AUDetector, Generator, GuidanceClassifier, Calibrator, Expert, Evaluator,
                FaceDetector)
}
