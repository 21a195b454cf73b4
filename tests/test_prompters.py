"""Prompters: template is varied and deterministic; llm runs a local causal LM (tiny, random)."""
import pytest

from synfer import labels as L
from synfer.stages import SampleRequest


def _reqs(n=6):
    exprs = ["happy", "sad", "fear", "neutral", "anger", "contempt"]
    return [SampleRequest(index=i, seed=100 + i, expression=exprs[i % 6], aus=L.au_dict(L.sample_aus(exprs[i % 6], i))) for i in range(n)]


def test_template_prompter_deterministic_and_descriptive():
    from synfer_plugins.prompters import TemplatePrompter

    p = TemplatePrompter()
    a, b = p.prompt(_reqs()), p.prompt(_reqs())
    assert a == b and len(set(a)) == len(a)
    assert "happy" in a[0] and "cheeks are" in a[0]  # emotion word + the AU's muscle movement, FEText caption style
    assert "sad" in a[1] and "neutral" in a[3]
    short = TemplatePrompter(TemplatePrompter.Config(style="short")).prompt(_reqs())
    assert "cheek raiser" in short[0] and "happy" in short[0]


def test_llm_prompter_with_tiny_random_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from synfer_plugins.prompters import LLMPrompter

    words = "a photo of person happy sad with smiling brows raised lips soft light background request description example".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(tmp_path)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    p = LLMPrompter(LLMPrompter.Config(model=str(tmp_path), max_new_tokens=8))
    out = p.prompt(_reqs(3))
    assert len(out) == 3 and all(isinstance(s, str) and s for s in out)
    assert p.prompt(_reqs(3)) == out  # greedy: deterministic
    with pytest.raises(FileNotFoundError, match="local transformers causal LM folder"):
        LLMPrompter(LLMPrompter.Config(model=str(tmp_path / "nope"))).prompt(_reqs(1))


def _tiny_llm(path, n_positions: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = "a photo of person happy sad with smiling brows raised lips soft light background request description example".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]").save_pretrained(path)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=n_positions, n_embd=16, n_layer=1, n_head=2)).save_pretrained(path)
    return path


def test_llm_prompter_fits_a_64_token_context_and_batches(tmp_path):
    """The ~100-token instruction does not fit a 64-token model: the short one does, with max_new_tokens cut to what is
    left (it crashed with IndexError before). Greedy requests go 16 to a generate call, with the prompts one call each gives."""
    from synfer_plugins.prompters import INSTRUCTION, LLMPrompter

    p = LLMPrompter(LLMPrompter.Config(model=str(_tiny_llm(tmp_path / "m64", 64)), max_new_tokens=60))
    _, tok = p.load()
    assert p.context_length() == 64 and len(tok(INSTRUCTION).input_ids) > 64
    texts, new = p.fit(_reqs(3))
    assert INSTRUCTION not in texts[0] and 8 <= new < 60 and max(len(tok(t).input_ids) for t in texts) + new <= 64
    calls = []
    hook = p.load()[0].register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    batched = p.prompt(_reqs(5))
    hook.remove()
    assert len(batched) == 5 and all(batched) and calls[0] == 5  # one generate call for all five
    assert [p.prompt([r])[0] for r in _reqs(5)] == batched  # left padding: each prompt as if alone
    with pytest.raises(ValueError, match="context of 16 tokens.*longer context"):
        LLMPrompter(LLMPrompter.Config(model=str(_tiny_llm(tmp_path / "m16", 16)))).prompt(_reqs(1))
