"""The "sd" generator and the AU adapter on tiny seeded components (seconds on a CPU)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from synfer.labels import AU_KEYS, au_dict, sample_aus  # noqa: E402
from synfer.stages import SampleRequest  # noqa: E402
from synfer_plugins.sd.au_adapter import AUAdapter  # noqa: E402
from synfer_plugins.sd.generator import SDGenerator
from synfer_plugins.sd.model import SDModel, build_word_tokenizer, create_tiny_model  # noqa: E402

CAPTIONS = [f"a photo of a {e} face, the person looks {e}" for e in ("happy", "sad", "surprised", "neutral")]
EXPRESSIONS = ("happy", "sad", "surprise", "neutral")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, adapter=True) -> SDModel:
    """16x16 pixel-space model, two UNet levels; the adapter gets non-trivial weights so it matters."""
    sd = create_tiny_model(CAPTIONS, size=16, block_out_channels=(16, 32), text_dim=32, max_length=16, seed=seed)
    if adapter:
        ad = AUAdapter.for_unet(sd.unet, num_tokens=2, hidden_dim=32)
        with torch.no_grad():
            for p in ad.parameters():
                p.add_(0.2 * torch.randn_like(p))
        sd.set_au_adapter(ad)
    return sd


def requests(n=4):
    return [SampleRequest(index=i, seed=1000 + i, expression=EXPRESSIONS[i % 4], aus=au_dict(sample_aus(EXPRESSIONS[i % 4], i)),
                          prompt=CAPTIONS[i % 4]) for i in range(n)]


def generator(path, **cfg) -> SDGenerator:
    return SDGenerator(SDGenerator.Config(model=str(path), steps=cfg.pop("steps", 4), device="cpu", **cfg))


def test_tokenizer_is_word_level(tmp_path):
    tok = build_word_tokenizer(CAPTIONS, max_length=12)
    ids = tok(["a happy face"], padding="max_length", max_length=12).input_ids[0]
    assert tok.convert_ids_to_tokens(ids[:5]) == ["<|startoftext|>", "a", "happy", "face", "<|endoftext|>"]
    tok.save_pretrained(tmp_path)
    from synfer_plugins.sd.model import load_tokenizer

    assert load_tokenizer(tmp_path)(["a happy face"], padding="max_length", max_length=12).input_ids[0] == ids


def test_save_load_round_trip_with_au_adapter(tmp_path):
    sd = tiny()
    sd.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "au_adapter.safetensors").exists() and (tmp_path / "m" / "au_adapter.json").exists()
    # the saved UNet is the plain one: no adapter weights or config inside it
    assert '"encoder_hid_dim_type": null' in (tmp_path / "m" / "unet" / "config.json").read_text()
    back = SDModel.from_pretrained(tmp_path / "m")
    assert back.au_adapter is not None
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    aus = torch.rand(2, len(AU_KEYS))
    with torch.no_grad():
        a = sd.predict_noise(x, t, sd.encode_text(CAPTIONS[:2]), aus)
        b = back.predict_noise(x, t, back.encode_text(CAPTIONS[:2]), aus)
    assert torch.equal(a, b)
    g1, g2 = generator(tmp_path / "m"), generator(tmp_path / "m")
    im1 = [np.asarray(s.image) for s in g1.generate(requests(2))]
    im2 = [np.asarray(s.image) for s in g2.generate(requests(2))]
    assert all(np.array_equal(p, q) for p, q in zip(im1, im2))
    # new UNet weights saved over the folder (a generator fine-tune) drop the adapter trained on the old ones
    SDModel.from_pretrained(tmp_path / "m", load_au_adapter=False).save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "au_adapter.safetensors").exists() and SDModel.from_pretrained(tmp_path / "m").au_adapter is None


def test_au_scale_zero_is_the_plain_unet():
    sd = tiny()
    x, t, aus = torch.randn(2, 3, 16, 16), torch.tensor([5, 900]), torch.rand(2, len(AU_KEYS))
    with torch.no_grad():
        emb = sd.encode_text(CAPTIONS[:2])
        sd.set_au_scale(1.0)
        with_au = sd.predict_noise(x, t, emb, aus)
        sd.set_au_scale(0.0)
        off = sd.predict_noise(x, t, emb, aus)
        AUAdapter.detach(sd.unet)
        plain = sd.unet(x, t, encoder_hidden_states=emb).sample
    assert torch.equal(off, plain)
    assert (with_au - plain).abs().max() > 1e-3  # the AU branch does something when on


def test_gradients_reach_only_the_adapter():
    sd = tiny()
    sd.unet.requires_grad_(False), sd.text_encoder.requires_grad_(False)
    sd.au_adapter.requires_grad_(True)
    x, t, aus = torch.randn(2, 3, 16, 16), torch.tensor([5, 900]), torch.rand(2, len(AU_KEYS))
    sd.predict_noise(x, t, sd.encode_text(CAPTIONS[:2]), aus).pow(2).mean().backward()
    adapter_ids = {id(p) for p in sd.au_adapter.parameters()}
    for name, p in list(sd.unet.named_parameters()) + list(sd.text_encoder.named_parameters()):
        if id(p) in adapter_ids:
            continue
        assert p.grad is None, name
    grads = [p.grad for p in sd.au_adapter.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_generate_does_not_depend_on_batch_size(tmp_path):
    """generate() runs fixed chunks whatever it is handed: two calls of 2 give the bytes of one call of 4."""
    tiny().save_pretrained(tmp_path / "m")
    reqs = requests(4)
    g = generator(tmp_path / "m", chunk=4)
    four = g.generate(reqs)
    two = g.generate(requests(4)[:2]) + g.generate(requests(4)[2:])
    assert [s.request.index for s in four] == [0, 1, 2, 3]
    for a, b in zip(two, four):
        assert a.image.size == (16, 16)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(four[0].image), np.asarray(four[1].image))


def test_generate_with_autoencoderkl(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    base = create_tiny_model(CAPTIONS, size=8, block_out_channels=(16, 32), text_dim=32, max_length=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    sd = SDModel(unet, base.text_encoder, base.tokenizer, base.scheduler, vae=vae, au_adapter=AUAdapter.for_unet(unet, num_tokens=2, hidden_dim=16))
    assert sd.native_size == 16 and not sd.pixel_space
    sd.save_pretrained(tmp_path / "m")
    g = generator(tmp_path / "m", steps=3, batch_size=2)
    out = g.generate(requests(3))
    assert [s.image.size for s in out] == [(16, 16)] * 3
    assert g.vae is not None and g.encode_image(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 8, 8)


def test_denoise_hooks_start_step_and_on_step(tmp_path):
    tiny().save_pretrained(tmp_path / "m")
    g = generator(tmp_path / "m", steps=5)
    reqs = requests(2)
    text_emb, aus = g.conditions(reqs)
    seen = []

    def on_step(i, t, latents, emb):
        seen.append(i)
        return emb + 0.01 if i == 3 else None  # Eq. 6-style update of the text embedding

    x_T = g.initial_latents(reqs)
    out = g.denoise(x_T, text_emb, aus, start_step=2, on_step=on_step)
    assert seen == [2, 3, 4] and out.shape == x_T.shape
    assert torch.isfinite(out).all()


def test_config_is_strict_and_plugin_registered():
    from pydantic import ValidationError

    from synfer.engine.registry import Registry

    with pytest.raises(ValidationError):
        SDGenerator.Config(stepz=3)
    reg = Registry()
    reg.load_entrypoints()
    assert reg.get("generator", "sd") is SDGenerator
    with pytest.raises(FileNotFoundError, match="synfer train generator"):
        SDGenerator(SDGenerator.Config(model="/nonexistent/model")).load()
