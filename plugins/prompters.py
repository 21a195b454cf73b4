"""Prompter plugins: enrich "a photo of a {expression} person" into a detailed prompt (paper Fig. 2)."""
from __future__ import annotations

from pydantic import Field

from synfer import hookimpl
from synfer import labels as L
from synfer.engine.seeds import stream_rng
from synfer.stages import Prompter, SampleRequest, StageConfig, missing_path

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
    licence = "MIT (synfer's own templates; no weights)"

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


SHORT_INSTRUCTION = "Describe a portrait photo of this request in detail.\n"  # for models whose context cannot hold INSTRUCTION
MIN_NEW_TOKENS = 8  # fewer left after the instruction: the model cannot write a prompt


class LLMPrompter(Prompter):
    """A transformers text-generation model from a local folder enriches the coarse prompt (paper Fig. 2).

    The instruction follows the paper's role/instruction style; greedy decoding by default, so a
    request always gets the same prompt, and requests are generated `batch_size` at a time (left
    padding); with `temperature > 0` sampling is seeded per sample, one request at a time. The
    instruction is checked against the model's context (`context_length`): a model too short for the
    full instruction gets SHORT_INSTRUCTION, and `max_new_tokens` shrinks to what is left.
    """

    name = "llm"
    licence = "MIT (code; the LLM folder the recipe names has its own licence)"

    class Config(StageConfig):
        model: str  # local folder with a causal LM and its tokenizer
        max_new_tokens: int = 60
        temperature: float = 0.0  # 0: greedy
        device: str = "cpu"
        mention_aus: bool = True
        fallback: bool = True  # an empty generation falls back to the template prompt
        batch_size: int = Field(16, gt=0)  # requests per generate call (greedy decoding)

    @classmethod
    def problems(cls, config):
        return missing_path(config, "model", "a local folder with a causal LM and its tokenizer (save_pretrained layout)",
                            "Nothing is downloaded: copy one there, or use `prompter: {plugin: template}`.")

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
            self._tok.padding_side = "left"  # a decoder continues from the right end of every row
            if self._tok.pad_token is None:
                self._tok.pad_token = self._tok.eos_token
            self._model = AutoModelForCausalLM.from_pretrained(str(path)).to(self.config.device).eval()
        return self._model, self._tok

    def context_length(self) -> int | None:
        """The model's context in tokens (max_position_embeddings, n_positions, ...), None when it has no fixed one."""
        cfg = self.load()[0].config
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
            if isinstance(getattr(cfg, key, None), int):
                return int(getattr(cfg, key))
        return None

    def request_text(self, r: SampleRequest) -> str:
        text = COARSE.format(expression=r.expression)
        if self.config.mention_aus:
            moves = describe_aus(r.aus)[:4]
            if moves:
                text += " (" + ", ".join(moves) + ")"
        return text

    def _text(self, r: SampleRequest, instruction: str) -> str:
        _, tok = self.load()
        user = f"Request: {self.request_text(r)}"
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "system", "content": instruction}, {"role": "user", "content": user}],
                                           add_generation_prompt=True, tokenize=False)
        return instruction + user + "\nDescription:"

    def _special(self) -> bool:
        """Whether tokenizing adds BOS/EOS: not for chat-template text, which holds its own."""
        return not getattr(self.load()[1], "chat_template", None)

    def _longest_request(self) -> SampleRequest:
        """The request with the most tokens this prompter can be given (longest class name, the 4 longest AU names):
        the answer's budget is sized for it, so a prompt never depends on which requests share its generate call."""
        _, tok = self.load()
        by_len = sorted(L.AU_KEYS, key=lambda k: len(tok(L.AU_NAMES[int(k[2:])]).input_ids))
        expression = max(L.EXPRESSIONS, key=lambda e: len(tok(e).input_ids))
        return SampleRequest(index=0, seed=0, expression=expression, aus={k: 1.0 for k in by_len[-4:]})

    def fit(self, requests: list[SampleRequest]) -> tuple[list[str], int]:
        """(model inputs, new tokens) that fit the context: the full instruction, else the short one; refused when neither
        leaves MIN_NEW_TOKENS for the answer."""
        _, tok = self.load()
        ctx = self.context_length()
        length = lambda t: len(tok(t, add_special_tokens=self._special()).input_ids)  # noqa: E731
        for instruction in (INSTRUCTION, SHORT_INSTRUCTION):
            texts = [self._text(r, instruction) for r in requests]
            if ctx is None:
                return texts, self.config.max_new_tokens
            longest = max(length(self._text(self._longest_request(), instruction)), *map(length, texts))
            if longest + self.config.max_new_tokens <= ctx:
                return texts, self.config.max_new_tokens
            if instruction is SHORT_INSTRUCTION and ctx - longest >= MIN_NEW_TOKENS:
                return texts, ctx - longest
        raise ValueError(f"prompter llm: {self.config.model} has a context of {ctx} tokens, but even the short instruction and "
                         f"request take {longest}, leaving fewer than {MIN_NEW_TOKENS} for the prompt. Use a model with a longer "
                         "context, or `prompter: {plugin: template}`.")

    def prompt(self, requests: list[SampleRequest]) -> list[str]:
        import torch

        model, tok = self.load()
        template = TemplatePrompter(TemplatePrompter.Config(style="short", mention_aus=self.config.mention_aus))
        texts, new_tokens = self.fit(requests)
        sampled = self.config.temperature > 0
        step = 1 if sampled else self.config.batch_size  # sampling: one request per call, so its seed alone decides it
        out = []
        for i in range(0, len(requests), step):
            inputs = tok(texts[i:i + step], return_tensors="pt", padding=True, add_special_tokens=self._special()).to(self.config.device)
            kwargs = dict(do_sample=False)
            if sampled:
                torch.manual_seed(requests[i].seed)
                kwargs = dict(do_sample=True, temperature=self.config.temperature)
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id, **kwargs)
            for r, row in zip(requests[i:i + step], gen[:, inputs["input_ids"].shape[1]:]):
                text = tok.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip()
                out.append(text if text or not self.config.fallback else template.prompt([r])[0])
        return out


@hookimpl
def register_stages(register):
    register(TemplatePrompter)
    register(LLMPrompter)
