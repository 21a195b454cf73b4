"""FEText builder end to end, resume, recipe validation, upscalers and the MLLM captioner."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from synfer import hookimpl
from synfer import labels as L
from synfer.engine.dataset import read_metadata
from synfer.commands.fetext import FETextRecipe, build_fetext, load_fetext_recipe, validate_fetext
from synfer.engine.registry import Registry
from synfer.engine.recipe import RecipeError
from synfer.stages import AUDetector, Captioner, StageConfig
from synfer_plugins import sources, upscalers


class PriorAUs(AUDetector):
    """Test AU detector: the FAU-FE prototype of the record's label at intensity 0.8."""

    name = "test-prior-aus"

    def detect(self, records):
        return [{f"AU{a}": 0.8 for a in L.FAU_FE_PRIOR.get(r.expression or "neutral", ())} for r in records]


class LabelCaptioner(Captioner):
    name = "test-label-caption"

    class Config(StageConfig):
        seed: int = -1

    def caption(self, records):
        return [f"a {r.image.width}px face looking {r.expression} (seed {self.config.seed})" for r in records]


class _Stubs:
    @hookimpl
    def register_stages(self, register):
        register(PriorAUs)
        register(LabelCaptioner)


@pytest.fixture
def registry():
    reg = Registry()
    for module in (sources, upscalers, _Stubs()):
        reg.add(module)
    return reg


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder with 9 readable faces in 3 classes (odd sizes) and one corrupt file."""
    root = tmp_path / "faces"
    for i, cls in enumerate(["happy"] * 4 + ["Sad"] * 3 + ["surprised"] * 2):
        (root / cls).mkdir(parents=True, exist_ok=True)
        arr = np.random.default_rng(i).integers(0, 255, (30 + i, 50, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / cls / f"{i:02d}.png")
    (root / "happy" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


def recipe(folder, out, **kw) -> FETextRecipe:
    data = {"output": str(out), "size": 32, "batch_size": 4, "seed": 7,
            "sources": [{"plugin": "imagefolder", "root": str(folder)}],
            "captioner": {"plugin": "test-label-caption"}, "au_detector": {"plugin": "test-prior-aus"}, **kw}
    return FETextRecipe(**data)


def test_build_end_to_end_loads_with_datasets(folder, tmp_path, registry):
    out = tmp_path / "fetext"
    summary = build_fetext(recipe(folder, out), registry, progress=False)
    assert (summary.written, summary.resumed, summary.total) == (9, 0, 9)
    assert summary.per_class == {"happy": 4, "sad": 3, "surprise": 2}
    assert summary.per_source == {"imagefolder": 9}
    assert len(summary.skipped) == 1 and "zz_broken.jpg (" in summary.skipped[0]
    assert "skipped 1 file(s) or row(s) (1 unreadable)" in summary.table() and "zz_broken.jpg" in summary.table()
    rows = read_metadata(out)
    assert [r["index"] for r in rows] == list(range(9))
    r = rows[0]
    assert r["expression"] == "happy" and r["label"] == L.label_space("affectnet8").index("happy")
    assert r["caption"] == "a 32px face looking happy (seed 7)"  # upscaled before captioning; recipe seed handed down
    assert r["aus"]["AU6"] == 0.8 and r["aus"]["AU1"] == 0.0 and set(r["aus"]) == set(L.AU_KEYS)
    assert r["au_scale"] == L.AU_SCALE and r["source"] == "imagefolder" and r["attributes"]["file"] == "happy/00.png"
    assert all(Image.open(out / row["file_name"]).size == (32, 32) for row in rows)
    saved = json.loads((out / "fetext_summary.json").read_text())
    assert saved["skipped_count"] == 1 and saved["total"] == 9

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert ds.num_rows == 9
    assert ds[0]["image"].size == (32, 32) and ds[0]["caption"].startswith("a 32px face")


def test_resume_writes_nothing_twice(folder, tmp_path, registry):
    out = tmp_path / "fetext"
    first = build_fetext(recipe(folder, out, limit=5), registry, progress=False)
    assert (first.written, first.total) == (5, 5)
    second = build_fetext(recipe(folder, out), registry, progress=False)
    assert (second.written, second.resumed, second.total) == (4, 5, 9)
    third = build_fetext(recipe(folder, out), registry, progress=False)
    assert (third.written, third.resumed, third.total) == (0, 9, 9)
    rows = read_metadata(out)
    assert sorted(r["index"] for r in rows) == list(range(9))
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 9
    assert len(list((out / "images").iterdir())) == 9


def test_label_space_filters_and_several_sources(folder, tmp_path, registry):
    out = tmp_path / "fetext"
    r = recipe(folder, out, label_space="fer2013",
               sources=[{"plugin": "imagefolder", "root": str(folder), "label_space": "affectnet8", "tag": "a"},
                        {"plugin": "imagefolder", "root": str(folder), "limit": 2, "tag": "b"}])
    s = build_fetext(r, registry, progress=False)
    assert s.per_source == {"a": 9, "b": 2} and s.total == 11
    rows = read_metadata(out)
    assert rows[0]["label"] == L.label_space("fer2013").index("happy")


def test_validation_reports_every_problem_at_once(registry, tmp_path):
    data = {"output": str(tmp_path), "size": 2, "sizee": 3,
            "sources": [{"plugin": "imagefolder", "rot": "x"}, {"plugin": "nope"}],
            "upscaler": {"plugin": "lanczos", "filter": "box"}, "captioner": {"plugin": "test-label-caption"},
            "au_detector": None}
    with pytest.raises(RecipeError) as err:
        validate_fetext(data, registry)
    text = str(err.value)
    for needle in ("size:", "sizee: unknown key", "sources.0.rot: unknown key", "sources.0.root: Field required",
                   "sources.1.plugin: no source named 'nope'", "upscaler.filter: unknown key"):
        assert needle in text, text


def test_recipe_file_and_overrides(folder, tmp_path, registry):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"plugin": "imagefolder", "root": str(folder)}],
                                    "captioner": {"plugin": "test-label-caption"}, "au_detector": None}))
    r = load_fetext_recipe(path, ["output=" + str(tmp_path / "o"), "size=48", "sources.0.limit=3"], registry)
    assert r.size == 48 and r.sources[0]["limit"] == 3 and r.output == str(tmp_path / "o")
    s = build_fetext(r, registry, progress=False)
    assert s.total == 3 and read_metadata(tmp_path / "o")[0]["aus"] is None


def test_fetext_module_does_not_import_torch():
    code = "import sys, synfer.commands.fetext; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builtin_recipe_validates():
    from pathlib import Path

    from synfer.engine.registry import get_registry

    _builtin_or_skip()
    r = load_fetext_recipe(Path(__file__).parents[1] / "recipes" / "fetext-procedural.yaml", [], get_registry())
    assert r.size == 64 and r.sources[0]["num_images"] == 20000


# ---------------------------------------------------------------- upscalers


def test_lanczos_aligns_to_a_square_of_the_target_size():
    up = upscalers.LanczosUpscaler()
    left_red = np.zeros((40, 100, 3), dtype=np.uint8)
    left_red[:, :30, 0] = 255  # only outside the centre square
    ims = [Image.fromarray(left_red), Image.new("RGB", (20, 30)), Image.new("L", (64, 64), 9)]
    out = up.upscale(ims, 64)
    assert [im.size for im in out] == [(64, 64)] * 3 and all(im.mode == "RGB" for im in out)
    assert np.asarray(out[0])[..., 0].max() == 0  # the centre crop dropped the red band
    assert [im.size for im in up.upscale(ims, 16)] == [(16, 16)] * 3


def tiny_upscale_pipeline(path):
    """A randomly initialised StableDiffusionUpscalePipeline (diffusers' dummy-component sizes, smaller)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{c + "</w>": 28 + i for i, c in enumerate(letters)}}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=1, sample_size=16, in_channels=7, out_channels=4, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True,
        only_cross_attention=(True, True, False), num_class_embeds=100)
    vae = AutoencoderKL(block_out_channels=[8, 8, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, scaling_factor=0.08333)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=16, projection_dim=32))
    pipe = StableDiffusionUpscalePipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16),
        low_res_scheduler=DDPMScheduler(), scheduler=DDIMScheduler(prediction_type="v_prediction"), max_noise_level=350)
    pipe.save_pretrained(path)
    return path


def test_sd_upscaler_with_tiny_components(tmp_path):
    pytest.importorskip("diffusers")
    model = tiny_upscale_pipeline(tmp_path / "x4")
    up = upscalers.SDUpscaler(upscalers.SDUpscaler.Config(model=str(model), steps=2, seed=3))
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8))
    large = Image.fromarray(rng.integers(0, 255, (90, 80, 3), dtype=np.uint8))
    out = up.upscale([small, large], 64)
    assert [im.size for im in out] == [(64, 64), (64, 64)]
    assert np.array_equal(np.asarray(out[1]), np.asarray(upscalers.lanczos(large, 64)))  # large faces skip SR
    again = up.upscale([small], 64)[0]
    assert np.array_equal(np.asarray(out[0]), np.asarray(again))  # seeded per image: same result alone or batched
    everything = upscalers.SDUpscaler(upscalers.SDUpscaler.Config(model=str(model), steps=2, only_smaller=False))
    assert everything.upscale([large], 64)[0].size == (64, 64)


def test_sd_upscaler_missing_model_says_what_to_do(tmp_path):
    up = upscalers.SDUpscaler(upscalers.SDUpscaler.Config(model=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="model_index.json.*lanczos"):
        up.upscale([Image.new("RGB", (8, 8))], 32)


# ---------------------------------------------------------------- MLLM captioner

CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} answer:{% endif %}")


def tiny_blip(path, chat: bool = False):
    """A randomly initialised BLIP captioner with a 20-word tokenizer, saved like a hub checkpoint."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] [DEC] a the face person smiling sad happy with eyes mouth open brows raised answer".split()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]")
    torch.manual_seed(0)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, encoder_hidden_size=32, bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3),
        projection_dim=32, image_text_hidden_size=32)
    BlipForConditionalGeneration(config).save_pretrained(path)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    if chat:
        processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(path)
    return path


def faces(n):
    from synfer.stages import FaceRecord

    return [FaceRecord(image=Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)), expression="happy")
            for i in range(n)]


@pytest.mark.parametrize("chat", [False, True], ids=["prefix", "chat"])
def test_mllm_captioner_with_a_tiny_random_model(tmp_path, chat):
    pytest.importorskip("transformers")
    from synfer_plugins.mllm_captioner import MLLMCaptioner

    model = tiny_blip(tmp_path / "blip", chat=chat)
    cap = MLLMCaptioner(MLLMCaptioner.Config(model=str(model), max_new_tokens=6, label_hint=True))
    recs = faces(3)
    first = cap.caption(recs)
    assert len(first) == 3 and all(isinstance(c, str) and c for c in first)
    assert cap.caption(recs) == first  # greedy decoding: deterministic
    assert cap.caption(recs[1:2]) == first[1:2]  # independent of the batch
    prompts = cap.prompts(recs[:1], cap._load()[1])
    if chat:
        assert "expert in facial expression analysis" in prompts[0] and "Examples of good captions" in prompts[0]
        assert "labels this face as 'happy'" in prompts[0]
    else:
        assert prompts == [cap.config.prefix] and first[0].startswith(cap.config.prefix.split()[0])


def test_mllm_captioner_missing_model_says_what_to_do(tmp_path):
    from synfer_plugins.mllm_captioner import MLLMCaptioner

    with pytest.raises(FileNotFoundError, match="config.json.*template"):
        MLLMCaptioner(MLLMCaptioner.Config(model=str(tmp_path))).caption(faces(1))


# ---------------------------------------------------------------- with the built-in procedural world


def _builtin_or_skip():
    from synfer.engine.registry import get_registry

    reg = get_registry()
    missing = [n for k, n in [("source", "procedural"), ("captioner", "template"), ("au_detector", "ground-truth")] if (k, n) not in reg.plugins]
    if missing:
        pytest.skip(f"built-in plugins not installed yet: {missing}")


def test_procedural_recipe_through_the_cli(tmp_path):
    _builtin_or_skip()
    from pathlib import Path

    from click.testing import CliRunner

    from synfer.commands.fetext import fetext_cli

    path = str(Path(__file__).parents[1] / "recipes" / "fetext-procedural.yaml")
    out = tmp_path / "fx"
    args = ["build", path, f"output={out}", "sources.0.num_images=24", "batch_size=10", "--no-progress"]
    res = CliRunner().invoke(fetext_cli, args)
    assert res.exit_code == 0, res.output
    assert "FEText: 24 images" in res.output and "per source: procedural 24" in res.output
    res = CliRunner().invoke(fetext_cli, args)  # resume: nothing new
    assert "(0 written now, 24 already there)" in res.output
    rows = read_metadata(out)
    assert len(rows) == 24 and all(r["caption"] and r["identity"].startswith("proc-train") for r in rows)
    datasets = pytest.importorskip("datasets")
    assert datasets.load_dataset("imagefolder", data_dir=str(out), split="train").num_rows == 24
    res = CliRunner().invoke(fetext_cli, ["validate", path, "sizee=3"])
    assert res.exit_code != 0 and "sizee: unknown key" in res.output


def test_preview_grid_through_the_cli(tmp_path):
    _builtin_or_skip()
    from click.testing import CliRunner

    from synfer.commands.cli import main

    out = tmp_path / "docs" / "preview.png"  # `fetext preview` is the procedural plugin's command (hook register_commands)
    res = CliRunner().invoke(main, ["fetext", "preview", "--out", str(out), "--identities", "2", "--size", "32"])
    assert res.exit_code == 0, res.output
    assert Image.open(out).size[1] == len(L.label_space("affectnet8")) * (32 + 2)


def tiny_qwen2_vl(path):
    """A Qwen2-VL-style folder: a tiny random Qwen2VLForConditionalGeneration, its image processor, and the video processor
    and processor configs Qwen2-VL checkpoints carry (the video processor needs torchvision)."""
    import json

    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    torch.manual_seed(0)
    config = Qwen2VLConfig(text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                           vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, patch_size=14, spatial_merge_size=2))
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    Qwen2VLImageProcessor().save_pretrained(path)
    (path / "video_preprocessor_config.json").write_text(json.dumps({"video_processor_type": "Qwen2VLVideoProcessor",
                                                                     "processor_class": "Qwen2VLProcessor"}))
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    return path


def test_mllm_captioner_names_the_extra_a_qwen2_vl_processor_needs(tmp_path, monkeypatch):
    """Without torchvision, validate (no weights loaded) and captioning both say to install it."""
    import importlib.util

    from synfer_plugins.mllm_captioner import MLLMCaptioner

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    folder = tiny_qwen2_vl(tmp_path / "qwen")
    cfg = MLLMCaptioner.Config(model=str(folder))
    (problem,) = MLLMCaptioner.problems(cfg)
    assert "Qwen2VLProcessor" in problem and "needs torchvision" in problem and "pip install torchvision" in problem
    with pytest.raises(ImportError, match="needs torchvision"):
        MLLMCaptioner(cfg).caption(faces(1))


def test_mllm_captioner_refuses_prefix_mode_for_a_chat_mllm(tmp_path):
    """A processor that places an image token through its chat template (LLaVA) cannot caption from a bare prefix."""
    from transformers import BertTokenizer, CLIPImageProcessor, LlavaProcessor

    from synfer_plugins.mllm_captioner import MLLMCaptioner

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] <image> a face".split()
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=BertTokenizer(vocab={w: i for i, w in enumerate(words)}),
                               chat_template=CHAT_TEMPLATE, image_token="<image>")
    cap = MLLMCaptioner(MLLMCaptioner.Config(model=str(tmp_path), mode="prefix"))
    with pytest.raises(ValueError, match="mode 'prefix'.*LlavaProcessor.*'<image>'.*Use `mode: chat`"):
        cap.prompts(faces(1), processor)
    auto = MLLMCaptioner(MLLMCaptioner.Config(model=str(tmp_path)))
    assert auto._mode(processor) == "chat"  # auto picks chat for it
