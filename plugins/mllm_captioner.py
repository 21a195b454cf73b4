"""Captioner `mllm`: a local transformers image-to-text model writes expression-focused captions.

Paper 4.2.1 captions FEText with ShareGPT-4V, "guiding it with carefully crafted
instructions": the instruction defines the model's role and gives examples of detailed
facial-expression descriptions. Any model that `AutoModelForImageTextToText` loads works
(LLaVA / ShareGPT-4V-style chat models, BLIP, ...), from a local folder only.

Two prompt styles:
- `chat`: the instruction (role + examples) goes through the processor's chat template
  with the image; used by instruction-following MLLMs.
- `prefix`: a short text the model continues (captioning models such as BLIP, which
  cannot follow an instruction).
`auto` picks `chat` when the processor has a chat template. `prefix` is refused for a chat MLLM
whose processor places an image token (LLaVA, Qwen2-VL): a bare prefix holds none and fails
inside transformers. Decoding is greedy, so the same image gives the same caption.

Some VLM processors need extras synfer does not install: Qwen2-VL's (and other video-capable
ones') need torchvision. `validate` says so from the folder's files, without loading anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from synfer import hookimpl
from synfer.stages import Captioner, StageConfig

ROLE = ("You are an expert in facial expression analysis who writes captions for a facial "
        "expression dataset. Describe the face in the image in one or two sentences: the emotion "
        "it conveys and the visible muscle movements behind it (brows, eyelids, cheeks, nose, lips, "
        "jaw), then briefly the person's apparent age, gender and head pose. Describe only what is visible.")

EXAMPLES = (
    "A young woman smiles broadly: her cheeks are raised, the corners of her lips are pulled up and "
    "her eyes crinkle, a warm and genuine expression of happiness; she faces the camera.",
    "A middle-aged man frowns with his brows lowered and drawn together, his upper eyelids raised in a "
    "glare and his lips pressed tight, showing anger; his head is turned slightly to the left.",
    "An elderly woman raises her eyebrows high, her eyes are wide open and her jaw drops, her mouth "
    "forming an O of surprise.",
)


def instruction(role: str = ROLE, examples=EXAMPLES, expression: str | None = None) -> str:
    """The paper-style instruction: the model's role, a few example captions, the task."""
    text = role + "\n\nExamples of good captions:\n" + "\n".join(f"- {e}" for e in examples)
    if expression:
        text += f"\n\nThe dataset labels this face as '{expression}'; describe how that shows, or what you see instead."
    return text + "\n\nNow write the caption for this face."


class MLLMCaptionerConfig(StageConfig):
    model: str  # local folder with the model and its processor (save_pretrained layout)
    mode: Literal["auto", "chat", "prefix"] = "auto"
    role: str = ROLE  # chat mode: the model's role and the task
    examples: list[str] = list(EXAMPLES)  # chat mode: example captions shown to the model
    prefix: str = "a close-up photo of a face whose expression shows"  # prefix mode: text to continue
    label_hint: bool = False  # chat mode: tell the model the dataset's expression label
    max_new_tokens: int = Field(77, gt=0)  # CLIP's text window
    num_beams: int = Field(1, gt=0)
    device: str = "cpu"
    dtype: str = "float32"


TORCHVISION_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor", "Qwen2_5OmniProcessor")


def processor_class(path: Path) -> str | None:
    """The processor class a model folder's config files name (read as JSON: no torch)."""
    import json

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            try:
                cls = json.loads(f.read_text()).get("processor_class")
            except ValueError:
                continue
            if cls:
                return cls
    return None


def missing_extras(path: Path) -> list[str]:
    """Packages the folder's processor needs that are not installed (torchvision for Qwen2-VL and video processors)."""
    import importlib.util

    needs = processor_class(path) in TORCHVISION_PROCESSORS or (path / "video_preprocessor_config.json").is_file()
    return ["torchvision"] if needs and importlib.util.find_spec("torchvision") is None else []


def extras_message(path: Path, extras: list[str]) -> str:
    return (f"mllm captioner: the processor in {path} ({processor_class(path) or 'unknown class'}) needs {', '.join(extras)}, "
            f"which is not installed (Qwen2-VL and other video-capable VLMs process images with it). Install the build that "
            f"matches your torch (pip install {' '.join(extras)}; see pytorch.org for the pairing), or caption with LLaVA, BLIP or "
            "`captioner: {plugin: template}`.")


class MLLMCaptioner(Captioner):
    name = "mllm"
    licence = "MIT (code; the MLLM folder the recipe names has its own licence)"
    Config = MLLMCaptionerConfig

    @classmethod
    def problems(cls, config):
        path = Path(config.model).expanduser()
        if not path.is_dir():
            return [f"model: {config.model!r} does not exist; expected a local folder with the model and its processor "
                    "(save_pretrained layout, e.g. a LLaVA or BLIP checkpoint). Nothing is downloaded: copy one there, "
                    "or use `captioner: {plugin: template}`"]
        extras = missing_extras(path)
        return [extras_message(path, extras)] if extras else []

    def __init__(self, config=None):
        super().__init__(config)
        self._model = self._processor = None

    def _load(self):
        if self._model is None:  # on first use: validation never loads weights
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor

            path = Path(self.config.model).expanduser()
            if not (path / "config.json").exists():
                raise FileNotFoundError(f"mllm captioner: {str(path)!r} holds no transformers model (no config.json); "
                                        "save a model and its processor there with save_pretrained, or use `captioner: {plugin: template}`")
            if extras := missing_extras(path):
                raise ImportError(extras_message(path, extras))
            try:
                self._processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            except ImportError as exc:  # an extra this module does not know of yet: name it when transformers does
                if "torchvision" in str(exc).lower():
                    raise ImportError(extras_message(path, ["torchvision"])) from exc
                raise
            model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=getattr(torch, self.config.dtype))
            self._model = model.to(self.config.device).eval()
            tokenizer = getattr(self._processor, "tokenizer", None)
            if tokenizer is not None and not model.config.is_encoder_decoder:
                tokenizer.padding_side = "left"  # decoder-only generation continues from the right end
        return self._model, self._processor

    @staticmethod
    def _chat_owner(processor):
        """The object holding the chat template: the processor, or (as some save it) its tokenizer."""
        for owner in (processor, getattr(processor, "tokenizer", None)):
            if owner is not None and getattr(owner, "chat_template", None):
                return owner
        return None

    def _mode(self, processor) -> str:
        if self.config.mode != "auto":
            return self.config.mode
        return "chat" if self._chat_owner(processor) is not None else "prefix"

    def prompts(self, records, processor) -> list[str]:
        if self._mode(processor) == "prefix":
            image_token = getattr(processor, "image_token", None)
            if image_token and self._chat_owner(processor) is not None:
                raise ValueError(f"mllm captioner: mode 'prefix' but {self.config.model} ({type(processor).__name__}) is a chat MLLM: "
                                 f"its prompt must hold the image token {image_token!r}, which its chat template places, so a bare "
                                 "prefix fails inside transformers. Use `mode: chat` (or `auto`, which picks chat for it); prefix mode "
                                 "is for captioning models such as BLIP.")
            return [self.config.prefix] * len(records)
        owner = self._chat_owner(processor)
        if owner is None:
            raise ValueError(f"mllm captioner: mode 'chat' but the processor in {self.config.model} has no chat template; "
                             "use `mode: prefix` for captioning models such as BLIP")
        texts = []
        for r in records:
            content = [{"type": "image"},
                       {"type": "text", "text": instruction(self.config.role, self.config.examples,
                                                            r.expression if self.config.label_hint else None)}]
            texts.append(owner.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False))
        return texts

    def caption(self, records):
        import torch

        model, processor = self._load()
        texts = self.prompts(records, processor)
        images = [r.image.convert("RGB") for r in records]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.config.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False, num_beams=self.config.num_beams)
        if self._mode(processor) == "prefix":  # the caption is the prefix and its continuation
            return [c.strip() for c in processor.batch_decode(out, skip_special_tokens=True)]
        prompt_ids = inputs["input_ids"]  # chat: keep only the answer
        if out.shape[1] >= prompt_ids.shape[1] and torch.equal(out[:, : prompt_ids.shape[1]], prompt_ids):
            return [c.strip() for c in processor.batch_decode(out[:, prompt_ids.shape[1]:], skip_special_tokens=True)]
        # Models that rewrite the prompt's first token (BLIP swaps [CLS] for its BOS): strip the decoded prefix.
        decoded = processor.batch_decode(out, skip_special_tokens=True)
        prefixes = processor.batch_decode(prompt_ids, skip_special_tokens=True)
        return [(d[len(p):] if d.startswith(p) else d).strip() for d, p in zip(decoded, prefixes)]


@hookimpl
def register_stages(register):
    register(MLLMCaptioner)
