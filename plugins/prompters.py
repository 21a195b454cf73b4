"""Prompter plugins: enrich "a photo of a {expression} person" into a detailed prompt (paper Fig. 2)."""
from __future__ import annotations

from synfer import hookimpl
from synfer import labels as L
from synfer.seeds import stream_rng
from synfer.stages import Prompter, SampleRequest, StageConfig

COARSE = "a photo of a {expression} person"

# Appearance and context phrases; the wording follows the template captioner so the
# tiny model's word-level tokenizer knows every word.
APPEARANCE = ("a young person", "a middle aged person", "an older person", "a person with short hair",
              "a person with long hair", "a person with glasses", "a bald person", "a person with a beard")
CONTEXT = ("plain background", "soft lighting", "frontal portrait", "studio photo", "close up face")
EMOTION_WORDS = {
    "neutral": "calm neutral", "happy": "happy joyful", "sad": "sad unhappy", "surprise": "surprised astonished",
    "fear": "fearful scared", "disgust": "disgusted", "anger": "angry furious", "contempt": "contemptuous",
}


def describe_aus(aus: dict[str, float], threshold: float = 0.3) -> list[str]:
    """Muscle movements in FACS words for the AUs above `threshold`, strongest first."""
    active = sorted(((v, k) for k, v in aus.items() if v >= threshold), reverse=True)
    return [L.AU_NAMES[int(k[2:])] for _, k in active]


class TemplatePrompter(Prompter):
    """Deterministic per sample seed: appearance + muscle movements + emotion, in the FEText caption
    language (the template captioner's), which is what the generator was fine-tuned on.

    `style: fetext` draws an appearance from the procedural world's identity sampler and writes the
    prompt with the template captioner; `style: short` is a compact SD-style prompt for real models.
    """

    name = "template"

    class Config(StageConfig):
        style: str = "fetext"  # fetext | short
        mention_aus: bool = True  # describe the sample's AU vector in FACS words
        max_aus: int = 4

    def prompt(self, requests: list[SampleRequest]) -> list[str]:
        if self.config.style == "fetext":
            return [self._fetext(r) for r in requests]
        if self.config.style != "short":
            raise ValueError(f"prompter.style={self.config.style!r}; expected 'fetext' or 'short'")
        out = []
        for r in requests:
            rng = stream_rng(r.seed, "prompt")
            parts = [f"a photo of {APPEARANCE[rng.integers(len(APPEARANCE))]}",
                     f"with a {EMOTION_WORDS[r.expression]} expression"]
            if self.config.mention_aus:
                moves = describe_aus(r.aus)[: self.config.max_aus]
                if moves:
                    parts.append("showing " + ", ".join(moves))
            parts.append(CONTEXT[rng.integers(len(CONTEXT))])
            out.append(", ".join(parts))
        return out

    def _fetext(self, r: SampleRequest) -> str:
        from dataclasses import asdict

        from synfer.stages import FaceRecord
        from synfer_plugins.captioners import template_caption
        from synfer_plugins.procedural import sample_identity

        attrs = asdict(sample_identity(int(stream_rng(r.seed, "prompt").integers(2**30))))
        record = FaceRecord(image=None, expression=r.expression, aus=r.aus if self.config.mention_aus else None, attributes=attrs)
        return template_caption(record, seed=r.seed, max_movements=self.config.max_aus)


INSTRUCTION = (
    "You are an expert in facial expressions and portrait photography. Expand the short request into one detailed "
    "description of a portrait photo: the person's appearance, the facial muscle movements of the expression, and "
    "the setting. Reply with the description only.\n"
    "Example request: a photo of a happy person\n"
    "Example description: a photo of a young woman with long dark hair, smiling broadly with raised cheeks and pulled "
    "lip corners, soft daylight, plain background\n"
)


class LLMPrompter(Prompter):
    """A transformers text-generation model from a local folder enriches the coarse prompt (paper Fig. 2).

    The instruction follows the paper's role/instruction style; greedy decoding by default, so a
    request always gets the same prompt; with `temperature > 0` sampling is seeded per sample.
    """

    name = "llm"

    class Config(StageConfig):
        model: str  # local folder with a causal LM and its tokenizer
        max_new_tokens: int = 60
        temperature: float = 0.0  # 0: greedy
        device: str = "cpu"
        mention_aus: bool = True
        fallback: bool = True  # an empty generation falls back to the template prompt

    def __init__(self, config=None):
        super().__init__(config)
        self._model = self._tok = None

    def load(self):
        if self._model is None:
            from pathlib import Path

            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = Path(self.config.model)
            if not path.is_dir():
                raise FileNotFoundError(f"prompter.model={path} is not a folder; give a local transformers causal LM folder")
            self._tok = AutoTokenizer.from_pretrained(str(path))
            self._model = AutoModelForCausalLM.from_pretrained(str(path)).to(self.config.device).eval()
        return self._model, self._tok

    def request_text(self, r: SampleRequest) -> str:
        text = COARSE.format(expression=r.expression)
        if self.config.mention_aus:
            moves = describe_aus(r.aus)[:4]
            if moves:
                text += " (" + ", ".join(moves) + ")"
        return text

    def prompt(self, requests: list[SampleRequest]) -> list[str]:
        import torch

        model, tok = self.load()
        template = TemplatePrompter(TemplatePrompter.Config(style="short", mention_aus=self.config.mention_aus))
        out = []
        for r in requests:
            user = f"Request: {self.request_text(r)}"
            if getattr(tok, "chat_template", None):
                ids = tok.apply_chat_template([{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": user}],
                                              add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            else:
                ids = tok(INSTRUCTION + user + "\nDescription:", return_tensors="pt").input_ids
            ids = ids.to(self.config.device)
            torch.manual_seed(r.seed)
            kwargs = dict(do_sample=True, temperature=self.config.temperature) if self.config.temperature > 0 else dict(do_sample=False)
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=self.config.max_new_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id, **kwargs)
            text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip()
            out.append(text if text or not self.config.fallback else template.prompt([r])[0])
        return out


@hookimpl
def register_stages(register):
    register(TemplatePrompter)
    register(LLMPrompter)
