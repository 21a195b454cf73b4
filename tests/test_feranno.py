"""FERAnno on tiny random components: capture counts/shapes, encoder, a short training, predict."""
import json

import numpy as np
import pytest
import torch

from synfer import labels as L
from synfer.engine.dataset import DatasetWriter


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from synfer_plugins.sd.model import create_tiny_model

    root = tmp_path_factory.mktemp("tiny-sd")
    sd = create_tiny_model(["a photo of a happy person", "a sad person", "a photo of a person"], size=16,
                           block_out_channels=(8, 16, 16), text_dim=16)
    sd.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def fetext(tmp_path_factory):
    from synfer_plugins.procedural import ProceduralSource

    root = tmp_path_factory.mktemp("fetext")
    src = ProceduralSource(ProceduralSource.Config(num_images=48, size=32, seed=0, expressions=["happy", "sad"]))
    w = DatasetWriter(root)
    for i, r in enumerate(src.records()):
        w.write(i, r.image, {"expression": r.expression, "aus": r.aus, "caption": f"a photo of a {r.expression} person"})
    return root


def test_capture_counts_and_shapes(tiny_model):
    from synfer_plugins.feranno.capture import UNetCapture, noise_to_t1
    from synfer_plugins.sd.model import SDModel

    sd = SDModel.from_pretrained(tiny_model)
    n_cross = sum(1 for k in sd.unet.attn_processors if k.endswith("attn2.processor"))
    before = dict(sd.unet.attn_processors)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad(), UNetCapture(sd.unet) as cap:
        x_t, ts = noise_to_t1(sd, images, [1, 2])
        ref = sd.predict_noise(x_t, ts, sd.encode_text(["a happy person", "a sad person"]))
        assert len(cap.store.maps) == n_cross > 0
        feats, att = cap.collect(4)
    assert cap.store.maps == [] and cap.features == []  # freed after the batch
    tokens = sd.max_length
    assert sorted(att) == [4, 8]  # cross-attention at the two lower resolutions of a 16x16 model
    for r, a in att.items():
        assert a.shape == (2, tokens, r, r)
        assert torch.allclose(a.sum(1), torch.ones(2, r, r), atol=1e-4)  # probabilities over tokens
    assert [f.shape[-1] for f in feats] == [4, 8, 16]
    assert dict(sd.unet.attn_processors).keys() == before.keys()
    with torch.no_grad():  # the capture does not change the UNet's output
        assert torch.allclose(sd.predict_noise(x_t, ts, sd.encode_text(["a happy person", "a sad person"])), ref, atol=1e-5)
    from synfer_plugins.feranno.encoder import build_encoder

    for order in ("coarse-to-fine", "fine-to-coarse"):  # both directions read every scale; gradients reach every carry conv
        torch.manual_seed(0)
        enc = build_encoder([f.shape[1] for f in feats], [f.shape[-1] for f in feats], tokens, 8, dim=16, pool=2, max_res=8, order=order)
        logits = enc(feats, att)
        assert logits.shape == (2, 8)
        logits.sum().backward()
        assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in list(enc.carry_f) + list(enc.carry_a))
    with pytest.raises(ValueError, match="fine-to-coarse"):
        build_encoder([8], [4], tokens, 8, order="sideways")


def test_train_and_predict(tiny_model, fetext, tmp_path):
    from synfer_plugins.feranno.stage import FERAnno
    from synfer_plugins.feranno.train import train_feranno
    from synfer_plugins.sd.generator import SDGenerator
    from synfer.stages import GeneratedSample, SampleRequest
    from PIL import Image

    enc, losses, metrics = train_feranno(fetext, tiny_model, tmp_path / "fa", test=fetext, iters=16, batch_size=8, lr=3e-3, dim=16, views=2,
                                          mixup=0.4, t=7, max_res=4)
    (cache,) = (tmp_path / "fa" / "work" / "calibrator").glob("features-*-v2")  # the calibrator's own work folder
    done = json.loads((cache / "done.json").read_text())
    f0 = np.load(cache / "f0.npy", mmap_mode="r")
    assert f0.dtype == np.float16 and f0.shape[0] == done["images"] == 96 and max(f0.shape[-2:]) <= 4  # pooled to max_res
    assert done["features"] == done["attention"] == 3 and np.load(cache / "a2.npy", mmap_mode="r").shape[-1] == 4
    assert done["bytes_per_image"] == sum(np.load(p, mmap_mode="r")[0].nbytes for p in cache.glob("*.npy"))
    assert np.mean([l for _, l in losses[-5:]]) < np.mean([l for _, l in losses[:5]])
    # held-out numbers over all 48 faces: the accuracy is a share of 48
    assert metrics["n"] == 48 and round(metrics["accuracy"] * 48, 6).is_integer()
    cal = FERAnno(FERAnno.Config(weights=str(tmp_path / "fa")))
    cal.bind(SDGenerator(SDGenerator.Config(model=str(tiny_model))))
    reqs = [SampleRequest(index=i, seed=i, expression="happy", aus=L.au_dict(L.sample_aus("happy", i)), prompt="a happy person") for i in range(3)]
    samples = [GeneratedSample(r, Image.new("RGB", (16, 16), (i * 40, 90, 90))) for i, r in enumerate(reqs)]
    p = cal.predict(samples)
    assert p.shape == (3, 8) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert np.allclose(cal.predict(samples), p)  # deterministic (noise from each sample's seed)
    # the stage reads at the timestep and condition the encoder was trained with, unless the recipe says otherwise
    saved = json.loads((tmp_path / "fa" / "config.json").read_text())
    assert saved["t"] == 7 and cal._read_as().t == 7
    assert saved["trained_with"]["iters"] == 16 and saved["trained_with"]["device"] == "cpu"
    assert cal._read_as().condition == "generic"
    other = FERAnno(FERAnno.Config(weights=str(tmp_path / "fa"), t=1))
    other.bind(cal.gen)
    assert other._read_as().t == 1 and not np.allclose(other.predict(samples), p)


def test_shifted_views_move_each_face_a_little():
    from synfer_plugins.feranno.train import shifted_views

    x = np.zeros((5, 12, 12, 3), np.uint8)
    x[:, 6, 6] = 255
    v = shifted_views(x, 3, seed=0)
    assert v.shape == (15, 12, 12, 3) and np.array_equal(v[:5], x)
    assert np.array_equal(v, shifted_views(x, 3, seed=0)) and not np.array_equal(v, shifted_views(x, 3, seed=1))
    peaks = np.array([np.unravel_index(im[..., 0].argmax(), (12, 12)) for im in v[5:]])
    assert np.abs(peaks - 6).max() <= 2 and (peaks != 6).any()


def test_feature_cache_key_follows_the_weights(tmp_path):
    """Retraining the AU adapter (or the UNet) in place must not reuse features captured with the old weights."""
    import os

    from synfer_plugins.feranno.train import model_key

    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "d").mkdir()
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"u")
    (tmp_path / "d" / "metadata.jsonl").write_text("{}\n")
    key = model_key(tmp_path / "m", tmp_path / "d")
    assert model_key(tmp_path / "m", tmp_path / "d") == key
    (tmp_path / "m" / "work").mkdir()
    (tmp_path / "m" / "work" / "features-x.safetensors").write_bytes(b"cache")  # the cache itself does not count
    assert model_key(tmp_path / "m", tmp_path / "d") == key
    adapter = tmp_path / "m" / "au_adapter.safetensors"
    adapter.write_bytes(b"a1")
    assert model_key(tmp_path / "m", tmp_path / "d") != key
    key = model_key(tmp_path / "m", tmp_path / "d")
    adapter.write_bytes(b"a2")
    os.utime(adapter, ns=(1, 1))
    assert model_key(tmp_path / "m", tmp_path / "d") != key


def test_bind_takes_a_diffusion_backbone_and_loads_nothing():
    from synfer_plugins.feranno.stage import FERAnno
    from synfer_plugins.sd.generator import SDGenerator

    class PixelsOnly:  # a generator without a UNet to read
        size = 32

    with pytest.raises(TypeError, match="lacks device, dtype, unet, scheduler, has_au_adapter, encode_image"):
        FERAnno().bind(PixelsOnly())
    gen = SDGenerator(SDGenerator.Config(model="/no/such/model"))
    FERAnno().bind(gen)  # checked on the class: binding does not load (or need) the weights
    assert gen.model is None


SHIPPED_BEFORE_SD_SCALE = [  # the shipped FERAnno on the probe below, computed before the per-scale attention reading
    [0.3126500, 0.0042925, 0.1151179, 0.0567823, 0.4867905, 0.0119947, 0.0101124, 0.0022597],
    [0.2816441, 0.0010376, 0.2673611, 0.0764520, 0.2663304, 0.0700568, 0.0203931, 0.0167250],
    [0.0235583, 0.0138391, 0.0098569, 0.2748686, 0.6628576, 0.0076210, 0.0045663, 0.0028325]]


def test_shipped_feranno_reads_as_it_was_trained():
    """Its config.json says attention 'nearest' (trained at max_res 16 on the 32 px toy): same numbers as before."""
    from PIL import Image

    from synfer.stages import GeneratedSample, SampleRequest
    from synfer_plugins.feranno.stage import MODELS, FERAnno
    from synfer_plugins.sd.generator import SDGenerator
    from synfer_plugins.sd.model import TINY_MODEL_DIR

    if not (MODELS / "feranno" / "config.json").exists() or not TINY_MODEL_DIR.exists():
        pytest.skip("shipped models not built")
    assert json.loads((MODELS / "feranno" / "config.json").read_text())["attention"] == "nearest"
    torch.set_num_threads(1)
    cal = FERAnno()
    cal.bind(SDGenerator())
    rng = np.random.default_rng(0)
    reqs = [SampleRequest(index=i, seed=i, expression="happy", aus=L.au_dict(L.sample_aus("happy", i)), prompt="a happy person") for i in range(6)]
    samples = [GeneratedSample(r, Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))) for r in reqs]
    assert np.allclose(cal.predict(samples)[:3], SHIPPED_BEFORE_SD_SCALE, atol=2e-7)
