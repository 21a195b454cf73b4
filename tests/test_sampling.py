"""Layout initialization (DDIM inversion) and semantic guidance (Eq. 4-6) on tiny components."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from synfer import labels as L  # noqa: E402
from synfer.engine.dataset import DatasetWriter  # noqa: E402
from synfer_plugins.sd.sampling import GuidanceConfig, LayoutConfig, SemanticGuidance, invert  # noqa: E402
from test_generator import generator, requests  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "unipc"])
def test_inversion_then_sampling_reconstructs(model_dir, scheduler):
    """DDIM inversion of a smooth image with guidance 1 up to the sampler's timesteps[start], then the
    sampler back with the same conditions. Measured (20 steps, depth 0.25 / 0.5): ddim 0.0090 / 0.0232,
    dpm++ 0.0068 / 0.0113, unipc 0.0066 / 0.0111."""
    g = generator(model_dir, steps=20, guidance_scale=1.0, scheduler=scheduler)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    image = torch.stack([0.6 * xx, 0.6 * yy, 0.5 * torch.exp(-(xx ** 2 + yy ** 2))])[None]
    prompts, aus = ["a photo of a happy face, the person looks happy"], g.load().au_tensor([None])
    for depth, bound in ((0.25, 0.015), (0.5, 0.035)):  # a random UNet: deep inversion is for trained models
        x_t, start = invert(g, image, prompts, aus, num_steps=int(20 * depth))
        assert start == 20 - int(20 * depth)
        rec = g.denoise(x_t, g.load().encode_text(prompts).detach(), aus, start_step=start)
        err = float((rec.clamp(-1, 1) - image).abs().mean())
        print(f"{scheduler} layout inversion depth {depth}: mean abs reconstruction error {err:.4f} (image range [-1, 1])")
        assert err < bound


def test_inversion_ends_at_the_samplers_start_timestep(model_dir, monkeypatch):
    """Inversion climbs the sampler's own grid: its UNet calls are at timesteps[start:] reversed, so the
    inverted latent sits at timesteps[start], the level denoising continues from."""
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    prompts = ["a photo of a happy face, the person looks happy"]
    for sched in ("ddim", "dpm++", "unipc"):
        g = generator(model_dir, steps=12, guidance_scale=1.0, scheduler=sched)
        m, ts = g.load(), g.timesteps().tolist()
        seen, real = [], m.predict_noise
        monkeypatch.setattr(m, "predict_noise", lambda x, t, *a, **k: (seen.append(int(t)), real(x, t, *a, **k))[1])
        _, start = invert(g, image, prompts, m.au_tensor([None]), num_steps=5)
        monkeypatch.undo()
        assert start == 7 and seen == ts[7:][::-1], (sched, seen, ts)
    assert generator(model_dir, steps=12, scheduler="dpm++").timesteps().tolist() != generator(model_dir, steps=12).timesteps().tolist()


def test_coarse_inversion_calls_and_end_point(model_dir, monkeypatch):
    """`layout.inversion_steps` K: K UNet calls on timesteps of the sampler's grid, evenly spread, the last at
    timesteps[start]; K at or above the steps inverted is the full inversion."""
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    prompts = ["a photo of a person"]
    g = generator(model_dir, steps=25, guidance_scale=1.0)
    m, ts = g.load(), g.timesteps().tolist()
    seen, real = [], m.predict_noise
    monkeypatch.setattr(m, "predict_noise", lambda x, t, *a, **k: (seen.append(int(t)), real(x, t, *a, **k))[1])
    for calls, want in ((4, [ts[20], ts[15], ts[10], ts[4]]), (1, [ts[4]]), (21, ts[4:][::-1]), (30, ts[4:][::-1])):
        seen.clear()
        _, start = invert(g, image, prompts, m.au_tensor([None]), num_steps=21, calls=calls)
        assert start == 4 and seen == want, (calls, seen)


def test_multistep_solvers_share_no_state(model_dir):
    """A fresh solver per denoise: the same request gives the same pixels alone, in a batch, and after
    other batches; the model's own scheduler (read by guidance and FERAnno) is never stepped."""
    for sched in ("dpm++", "unipc"):
        g = generator(model_dir, steps=6, scheduler=sched)
        first = np.asarray(g.generate(requests(1))[0].image)
        g.generate(requests(3))
        again = [np.asarray(s.image) for s in g.generate(requests(2))]
        assert np.array_equal(first, again[0]) and not np.array_equal(again[0], again[1])
        assert getattr(g.load().scheduler, "num_inference_steps", None) is None and type(g.load().scheduler).__name__ == "DDIMScheduler"
    ddim = np.asarray(generator(model_dir, steps=6).generate(requests(1))[0].image)
    assert not np.array_equal(first, ddim)


def test_eta_is_ddim_only():
    from synfer_plugins.sd.generator import SDGenerator

    assert any("eta=0.5" in p and "generator.eta=0" in p for p in SDGenerator.problems(SDGenerator.Config(eta=0.5, scheduler="unipc")))
    assert not SDGenerator.problems(SDGenerator.Config(eta=0.5))


def test_layout_init_uses_fetext_faces(model_dir, tmp_path):
    from PIL import Image

    w = DatasetWriter(tmp_path / "fetext")
    for i, e in enumerate(["neutral", "happy", "neutral"]):
        w.write(i, Image.new("RGB", (32, 32), (40 * i, 100, 150)), {"expression": e})
    g = generator(model_dir, layout=dict(enabled=True, source=str(tmp_path / "fetext"), depth=0.5))
    reqs = requests(3)
    out = g.generate(reqs)
    assert all(r.layout_source in ("images/00000000.png", "images/00000002.png") for r in reqs)  # neutral faces only
    assert out[0].extra["layout_init"]["depth"] == 0.5
    g2 = generator(model_dir, layout=dict(enabled=True, source=str(tmp_path / "fetext"), depth=0.5, expressions="match"))
    happy = [r for r in requests(4) if r.expression == "happy"]
    g2.generate(happy)
    assert all(r.layout_source == "images/00000001.png" for r in happy)  # the one happy face
    with pytest.raises(ValueError, match="layout.source"):
        generator(model_dir, layout=dict(enabled=True)).generate(requests(1))


def test_layout_cache_reuses_inversions_with_the_same_bytes(model_dir, tmp_path):
    """A face drawn again is not inverted again, and its x_t is the very one its own chunk would compute."""
    from PIL import Image

    w = DatasetWriter(tmp_path / "fetext")
    for i in range(3):
        w.write(i, Image.new("RGB", (32, 32), (70 * i, 100, 150 - 40 * i)), {"expression": "neutral"})
    lay = dict(enabled=True, source=str(tmp_path / "fetext"), depth=0.5, expressions=None, bank=False)  # RAM only
    g = generator(model_dir, chunk=4, layout=lay)
    out = g.generate(requests(12))  # 3 chunks of 4 slots drawn from 3 faces
    layout = g._layout()
    assert layout.inversions == len({layout.pick(r) for r in requests(12)}) <= 3  # each face drawn is inverted once
    for k in range(3):
        chunk = requests(12)[4 * k:4 * k + 4]
        x, start = layout(chunk)  # every face cached by now
        x_ref, start_ref = invert(g, layout.load_images([r.layout_source for r in chunk], g.size), [layout.cfg.prompt] * 4, None,
                                  layout.num_inverted(4))
        assert start == start_ref and torch.equal(x, x_ref)  # the bytes of inverting the chunk as one batch
        assert x.stride() == x_ref.stride()  # in its memory format too: the quickstart's denoising bytes depend on it
        ref = g.to_pil(g.sample(chunk, x_T=x_ref, start_step=start))  # and so the images of sampling from them (memory format too)
        assert all(np.array_equal(np.asarray(a), np.asarray(b.image)) for a, b in zip(ref, out[4 * k:4 * k + 4]))
    assert layout.reuses > 0
    fresh = generator(model_dir, chunk=4, layout=lay)._layout()
    fresh(requests(4))
    assert len(fresh.inverted) == 3  # the padding slots of the first batch inverted the faces not drawn yet
    g_off = generator(model_dir, chunk=4, layout={**lay, "cache_mb": 0})
    out_off = g_off.generate(requests(12))
    assert g_off._layout().inversions > layout.inversions
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(out, out_off))


def test_layout_bank_serves_later_runs_the_same_bytes(model_dir, tmp_path, caplog):
    """Inverted faces go to SOURCE/work/layout-<key>/: a new generator (a rerun, a resume, another rank) inverts none
    of them and samples the same bytes; another setting the bytes depend on gets its own bank; a read-only source
    only turns the bank off."""
    from PIL import Image

    w = DatasetWriter(tmp_path / "fetext")
    for i in range(3):
        w.write(i, Image.new("RGB", (32, 32), (70 * i, 100, 150 - 40 * i)), {"expression": "neutral"})
    lay = dict(enabled=True, source=str(tmp_path / "fetext"), depth=0.5, expressions=None)
    first = generator(model_dir, chunk=4, layout=lay)
    out = first.generate(requests(8))
    bank = first._layout().bank()
    assert bank.folder.parent == tmp_path / "fetext" / "work" and bank.writes == 3 and first._layout().inversions == 3
    again = generator(model_dir, chunk=4, layout=lay)
    out_again = again.generate(requests(8))
    assert again._layout().inversions == 0 and again._layout().bank().reads == 3
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(out, out_again))
    assert all(a.extra == b.extra for a, b in zip(out, out_again))
    deeper = generator(model_dir, chunk=4, layout={**lay, "depth": 0.75})
    deeper.generate(requests(4))
    assert deeper._layout().bank().folder != bank.folder and deeper._layout().inversions == 3
    assert len(list((tmp_path / "fetext" / "work").iterdir())) == 2
    assert not list(bank.folder.glob("*.tmp*"))  # written under a temporary name, then renamed

    ro = tmp_path / "ro"  # a source whose work/ cannot be made (root ignores a read-only mode, so: a file in the way)
    DatasetWriter(ro).write(0, Image.new("RGB", (32, 32), (90, 100, 110)), {"expression": "neutral"})
    (ro / "work").write_text("")
    g = generator(model_dir, chunk=4, layout={**lay, "source": str(ro)})
    with caplog.at_level("WARNING"):
        assert len(g.generate(requests(4))) == 4
    assert g._layout().bank().folder is None and "layout bank off" in caplog.text


def test_semantic_guidance_lowers_loss_and_spares_weights(model_dir, classifier):
    g = generator(model_dir, steps=10)
    m = g.load()
    reqs = requests(3)
    text, aus = g.conditions(reqs)
    latents = g.initial_latents(reqs)
    t = g.timesteps()[5]
    sg = SemanticGuidance(g, classifier, reqs, aus, GuidanceConfig(start=0.0, lambda_g=0.5))

    def loss(c):
        with torch.no_grad():
            eps = m.predict_noise(latents, t, c, aus)
            a = m.scheduler.alphas_cumprod[int(t)]
            x0 = (latents - (1 - a).sqrt() * eps) / a.sqrt()
            return torch.nn.functional.cross_entropy(classifier.forward(x0.clamp(-1, 1)), sg.targets, reduction="none")

    new = sg(5, t, latents, text)
    assert new.shape == text.shape and not torch.equal(new, text)
    assert (loss(new) < loss(text)).all()  # Eq. 6 moves each sample's embedding downhill
    step = (new - text).flatten(1).norm(dim=1)
    assert torch.allclose(step, torch.full_like(step, 0.5), atol=1e-4)  # normalised step of size lambda_g
    assert all(p.grad is None for p in list(m.unet.parameters()) + list(classifier.net.parameters()))
    assert sg(0, t, latents, text) is not None and SemanticGuidance(g, classifier, reqs, aus, GuidanceConfig(start=0.9))(5, t, latents, text) is None


def test_guided_generation_is_batch_size_invariant(model_dir, classifier):
    imgs = {}
    for bs in (1, 3):  # one sample per generate() call vs all three: the same chunk of 3
        g = generator(model_dir, steps=6, chunk=3, batch_size=bs, semantic_guidance=dict(start=0.5, lambda_g=0.3))
        out = [s for r in requests(3) for s in g.generate([r], guidance=classifier)] if bs == 1 else g.generate(requests(3), guidance=classifier)
        imgs[bs] = [np.asarray(s.image) for s in out]
        assert out[0].extra["semantic_guidance"]["lambda_g"] == 0.3
    for a, b in zip(imgs[1], imgs[3]):
        assert np.array_equal(a, b)
    # the moved embedding is what the later steps denoise with: guided != unguided, and a zero
    # step (lambda_g 0, same callback) gives back the unguided pixels exactly
    # (first sample only, at its place in the chunk: the same sample as in the batch)
    g = generator(model_dir, steps=6, batch_size=3, semantic_guidance=dict(start=0.5, lambda_g=0.0))
    zero = np.asarray(g.generate(requests(1), guidance=classifier)[0].image)
    plain = np.asarray(g.generate(requests(1), guidance=None)[0].image)
    assert np.array_equal(zero, plain) and not np.array_equal(imgs[3][0], plain)


@pytest.mark.parametrize("cfg, guided", [
    (dict(), list(range(8, 25))),  # today's default: from round(0.3 * 25) = 8 to the last step
    (dict(every=2), list(range(8, 25, 2))),
    (dict(stop=0.7), list(range(8, 18))),  # round(0.7 * 25) = 18 is the first step after the window
    (dict(every=3, stop=0.7), [8, 11, 14, 17]),
    (dict(start=0.0, every=4), [0, 4, 8, 12, 16, 20, 24]),
    (dict(start=0.5, stop=0.5), []),
])
def test_guidance_schedule(model_dir, classifier, cfg, guided):
    g = generator(model_dir, steps=25)
    reqs = requests(2)
    sg = SemanticGuidance(g, classifier, reqs, None, GuidanceConfig(**cfg))
    assert [i for i in range(25) if sg.guides(i)] == guided
    text, aus = g.conditions(reqs)
    sg.aus = aus
    latents, ts = g.initial_latents(reqs), g.timesteps()
    calls = [i for i in range(25) if sg(i, ts[i], latents, text) is not None]  # the callback moves the embedding on these steps only
    assert calls == guided


def test_sparser_guidance_is_recorded_and_changes_the_images(model_dir, classifier):
    outs = {}
    for every in (1, 2):
        g = generator(model_dir, steps=6, semantic_guidance=dict(start=0.0, lambda_g=0.3, every=every))
        out = g.generate(requests(1), guidance=classifier)
        outs[every] = np.asarray(out[0].image)
        assert out[0].extra["semantic_guidance"]["every"] == every and out[0].extra["semantic_guidance"]["stop"] == 1.0
    assert not np.array_equal(outs[1], outs[2])


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_reuse_forward_skips_the_conditional_pass_of_guided_steps(model_dir, classifier, cfg_scale):
    """semantic_guidance.reuse_forward: a guided step denoises with the noise its own forward predicted, so
    it makes one UNet forward fewer (the conditional half of a CFG pair); with a zero step (lambda_g 0)
    that noise is exactly what the skipped pass would give, so the images agree up to batching error. The passes
    run in one dtype (forward_dtype none): under `auto` on a BF16 host the skipped pass would be bfloat16 and the
    reused one float32, a difference of dtype, not of reuse (test_forward_dtype_* cover that)."""
    calls, out = {}, {}
    for reuse in (False, True):
        g = generator(model_dir, steps=6, chunk=2, guidance_scale=cfg_scale, forward_dtype=None,
                      semantic_guidance=dict(start=0.5, lambda_g=0.0, reuse_forward=reuse))
        seen = []
        hook = g.load().unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
        res = g.generate(requests(2), guidance=classifier)
        hook.remove()
        calls[reuse], out[reuse] = seen, np.stack([np.asarray(s.image, dtype=np.int16) for s in res])
        assert res[0].extra["semantic_guidance"].get("reuse_forward", False) is reuse
    # 3 guided steps (3, 4, 5 of 6): each skips one forward of the conditional batch (2 samples)
    pair = 4 if cfg_scale != 1.0 else 2
    assert sum(calls[False]) - sum(calls[True]) == 3 * 2 and calls[False].count(pair) - calls[True].count(pair) == 3
    assert np.abs(out[True] - out[False]).max() <= 2  # lambda_g 0: the same noise, batched differently
    g = generator(model_dir, steps=6, chunk=2, guidance_scale=cfg_scale, forward_dtype=None,
                  semantic_guidance=dict(start=0.5, lambda_g=2.0, reuse_forward=True))
    moved = np.stack([np.asarray(s.image, dtype=np.int16) for s in g.generate(requests(2), guidance=classifier)])
    assert not np.array_equal(moved, out[True])  # a real step still moves the samples (from the next step on)


def test_forward_dtype_autocasts_the_gradient_free_passes_only(model_dir, classifier):
    """generator.forward_dtype: denoising and inversion passes run under bfloat16 autocast, the guided
    step's forward + backward does not; the images stay close to float32's and the record says so."""
    seen = []  # (autocast on, grad enabled) for every UNet pass

    def spy(module, args):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))

    out = {}
    for fwd in (None, "bfloat16"):
        g = generator(model_dir, steps=6, guidance_scale=1.0, forward_dtype=fwd, chunk=2,
                      semantic_guidance=dict(start=0.0, lambda_g=0.3, every=2))
        handle = g.load().unet.register_forward_pre_hook(spy)
        seen.clear()
        samples = g.generate(requests(2), guidance=classifier)
        image = torch.rand(1, 3, 16, 16) * 2 - 1
        invert(g, image, ["a photo of a person"], g.load().au_tensor([None]), num_steps=3)
        handle.remove()
        out[fwd] = np.stack([np.asarray(s.image, dtype=np.float32) for s in samples])
        guided = [a for a, grad in seen if grad]
        plain = [a for a, grad in seen if not grad]
        assert len(guided) >= 3 and len(plain) == 6 + 3  # steps 0, 2, 4 guided (in micro-batches); 6 denoising + 3 inversion passes
        assert not any(guided) and all(plain) == (fwd is not None) and any(plain) == (fwd is not None)
        assert samples[0].extra["generator"].get("forward_dtype") == fwd
    diff = np.abs(out["bfloat16"] - out[None]).mean() / 255
    print(f"forward_dtype bfloat16 vs float32: mean abs pixel difference {diff:.4f} (of 1)")
    assert 0 < diff < 0.02


@pytest.mark.parametrize("native", [True, False])
def test_forward_dtype_auto_follows_the_cpu(model_dir, monkeypatch, native):
    """auto: bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), else none; the record says which."""
    monkeypatch.delenv("SYNFER_NATIVE_BF16", raising=False)  # the CPU's own answer, not CI's forced one
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    g = generator(model_dir, steps=2)
    assert g.config.forward_dtype == "auto" and g.load().forward_dtype == (torch.bfloat16 if native else None)
    assert g.settings(None)["generator"].get("forward_dtype") == ("bfloat16" if native else None)
    assert generator(model_dir, steps=2, dtype="bfloat16").load().forward_dtype is None  # a bf16 model: nothing to cast
    monkeypatch.setenv("SYNFER_NATIVE_BF16", "0" if native else "1")  # the switch CI uses wins over the CPU's answer
    assert generator(model_dir, steps=2).load().forward_dtype == (None if native else torch.bfloat16)
