"""Swapping the backbone (issue 39): every x0/noise formula honours `prediction_type`.

A perfect model of one image x0 and one noise eps (`Oracle`) returns, for any x on their trajectory
x = sqrt(a) x0 + sqrt(1 - a) eps, exactly what a perfectly trained UNet of a prediction type outputs at x's
level. Then the x0 that semantic guidance hands the classifier (Eq. 4) and DDIM inversion (on DDIM's grid,
on a multistep solver's grid, and on a coarse grid) are exact: the only error left is float32 rounding.
"""
import pytest

torch = pytest.importorskip("torch")

from synfer.stages import SampleRequest  # noqa: E402
from synfer_plugins.sd.prediction import model_x0, split_prediction, training_target  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ("epsilon", "v_prediction", "sample")


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class Oracle:
    """predict_noise of a model that knows x0 and eps: it reads x's level (p, q) = (sqrt(a), sqrt(1 - a)) off x
    by least squares and outputs eps, v = p eps - q x0, or x0. It ignores t, as a perfect model may."""

    def __init__(self, x0, eps, kind: str):
        self.x0, self.eps, self.kind = x0, eps, kind

    def __call__(self, latents, t, text_emb, aus=None, **kw):
        basis = torch.stack([self.x0.flatten(1), self.eps.flatten(1)], -1).double()  # (B, N, 2)
        p, q = torch.linalg.lstsq(basis, latents.flatten(1).double()[..., None]).solution.to(latents.dtype).unbind(1)
        p, q = p.view(-1, 1, 1, 1), q.view(-1, 1, 1, 1)
        out = {"epsilon": self.eps, "v_prediction": p * self.eps - q * self.x0, "sample": self.x0}[self.kind]
        return out + 0 * text_emb.sum()  # in the graph of the text embedding, as a UNet is (guidance differentiates it)


def pair(n=2, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.8 * torch.rand(n, 3, side, side, generator=g) * 2 - 0.8, torch.randn(n, 3, side, side, generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_split_prediction_and_training_target_are_exact_for_a_perfect_model(kind):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=kind)
    x0, eps = pair()
    for t in (1, 250, 700, 999):
        a = sched.alphas_cumprod[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        out = Oracle(x0, eps, kind)(x_t, t, torch.zeros(1))
        x0_hat, eps_hat = split_prediction(out, x_t, a, kind)
        assert rel(x0_hat, x0) < 1e-4 and rel(model_x0(sched, out, x_t, torch.tensor([t, t])), x0) < 1e-4
        if t < 999:  # at t=999 eps is nearly all of x_t: read back through 1 / sqrt(a) ~ 16, float32 keeps ~1e-5
            assert rel(eps_hat, eps) < 1e-4
        # the loss target is what the perfect model outputs
        assert rel(training_target(sched, x0, eps, torch.tensor([t, t])), out) < 1e-5
    if kind == "v_prediction":  # reading v as eps (the old formula) is far off: the test sees the difference
        assert rel(split_prediction(out, x_t, a, "epsilon")[0], x0) > 0.5


def _generator(kind, scheduler="ddim", **cfg):
    """The tiny pixel-space model (test_generator.tiny) with a perfect-model UNet of `kind` and an exact DDIM setup
    (x0 not clipped, the clean level a = 1)."""
    from diffusers import DDIMScheduler
    from test_generator import tiny

    from synfer_plugins.sd.generator import SDGenerator

    gen = SDGenerator(SDGenerator.Config(steps=cfg.pop("steps", 10), device="cpu", scheduler=scheduler, guidance_scale=1.0,
                                         forward_dtype=None, channels_last=False, **cfg))
    m = tiny(adapter=False)
    m.scheduler = DDIMScheduler.from_config(m.scheduler.config, prediction_type=kind, clip_sample=False, set_alpha_to_one=True)
    gen.model = m
    return gen, m


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_guidance_hands_the_classifier_the_exact_x0(kind):
    """Eq. 4 inside SemanticGuidance: the image the classifier reads is x0 (pixel space: no decode)."""
    from synfer_plugins.sd.sampling import GuidanceConfig, SemanticGuidance

    gen, m = _generator(kind)
    x0, eps = pair()
    m.predict_noise = Oracle(x0, eps, kind)
    seen = []

    class Recorder:
        name, label_space = "recorder", "affectnet8"

        def forward(self, images):
            seen.append(images.detach())
            return images.mean(dim=(2, 3)) @ torch.ones(3, 8)

    reqs = [SampleRequest(index=i, seed=i, expression=e, aus={}, prompt=e) for i, e in enumerate(["happy", "sad"])]
    text, _ = gen.conditions(reqs)
    for i, t in list(enumerate(gen.timesteps()))[3:8:2]:
        a = m.scheduler.alphas_cumprod[int(t)]
        SemanticGuidance(gen, Recorder(), reqs, None, GuidanceConfig(start=0.0))(i, t, a.sqrt() * x0 + (1 - a).sqrt() * eps, text)
        err = rel(seen[-1], x0)
        print(f"{kind} t={int(t)}: x0 relative error {err:.2e}")
        assert err < 1e-4


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler, calls", [("ddim", None), ("dpm++", None), ("ddim", 3)])
def test_inversion_is_exact_for_a_perfect_model(kind, scheduler, calls):
    """DDIM inversion lands on x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps at the sampler's timesteps[start_step]:
    DDIMInverseScheduler on DDIM's grid; `ddim_invert_onto` on DPM-Solver++'s grid and on a coarse grid."""
    from synfer_plugins.sd.sampling import invert

    gen, m = _generator(kind, scheduler)
    x0, eps = pair()
    m.predict_noise = Oracle(x0, eps, kind)
    x_t, start = invert(gen, x0, ["a photo of a person"] * 2, None, num_steps=7, calls=calls)
    a = m.scheduler.alphas_cumprod[int(gen.timesteps()[start])]
    err = rel(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    print(f"{kind} {scheduler} calls={calls}: inversion relative error {err:.2e}")
    assert start == 3 and err < 1e-4


def _validate(tmp_path, model):
    """`synfer validate` of the quickstart with generator.model=MODEL, in a fresh interpreter that must not import torch."""
    import subprocess
    import sys
    from pathlib import Path

    args = ["validate", "recipes/quickstart.yaml", "generator.layout.source=tests", "evaluators.4.reference=tests",
            f"output={tmp_path / 'out'}", f"generator.model={model}"]
    code = ("import sys, runpy; sys.argv=['synfer']+%r\n"
            "try:\n    runpy.run_module('synfer.commands.cli', run_name='__main__')\nexcept SystemExit as e:\n    print('exit', e.code)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'" % (args,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert "torch was imported" not in out.stderr, out.stderr
    return out.stdout + out.stderr


@pytest.mark.parametrize("pipeline", ["StableDiffusion3Pipeline", "FluxPipeline", "StableDiffusionXLPipeline"])
def test_validate_refuses_a_pipeline_the_sd_generator_cannot_run(tmp_path, pipeline):
    """model_index.json read as JSON: SD3 and FLUX folders are refused by name, with the supported ones and no training hint."""
    import json

    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    out = _validate(tmp_path, folder)
    if pipeline == "StableDiffusionXLPipeline":
        assert f"names {pipeline}" not in out and "ok (" in out, out
        return
    assert f"model_index.json names {pipeline}" in out and "StableDiffusionPipeline, StableDiffusionXLPipeline" in out, out
    assert "transformer backbone" in out and "synfer train generator" not in out, out


@pytest.fixture
def pooled_plugin(monkeypatch):
    """The global registry with tests/backbone_plugin.py added, as an installed plugin would be."""
    import backbone_plugin

    import synfer.engine.registry as plugins

    reg = plugins.Registry()
    reg.load_entrypoints()
    reg.add(backbone_plugin, provider="synfer-pooled")
    monkeypatch.setattr(plugins, "_REGISTRY", reg)
    return backbone_plugin


def test_a_third_party_backbone_in_one_short_file_trains_and_samples(pooled_plugin, tmp_path):
    """tests/backbone_plugin.py (well under 100 lines) adds a family: the built-in `sd` refuses its folders, the
    plugin's generator trains (generator, AU adapter, calibrator via --generator) and runs layout, guidance, the AU
    adapter and FERAnno on them."""
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from test_families import Clf, _train

    from synfer import labels as L
    from synfer.engine.dataset import DatasetWriter
    from synfer_plugins.sd.generator import SDGenerator

    source = Path(pooled_plugin.__file__).read_text().splitlines()
    assert len(source) < 100, len(source)
    w = DatasetWriter(tmp_path / "fetext")
    rng = np.random.default_rng(0)
    for i, e in enumerate(["neutral", "happy", "sad", "anger"]):
        w.write(i, Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                {"expression": e, "aus": L.au_dict(L.sample_aus(e, i)), "caption": f"a photo of a {e} person"})
    base = pooled_plugin.build_pooled(tmp_path / "base", [f"a photo of a {e} person" for e in ("neutral", "happy", "sad", "anger")])
    assert SDGenerator.problems(SDGenerator.Config(model=str(base)))  # the built-in refuses the family by name ...
    assert not pooled_plugin.PooledTextGenerator.problems(pooled_plugin.PooledTextGenerator.Config(model=str(base)))  # ... the plugin runs it
    common = ["--data", tmp_path / "fetext", "--iters", 3, "--batch-size", 2, "--log-interval", 1, "--generator", "sd-pooled"]
    _train(["generator", *common, "--model", base, "--out", tmp_path / "fer"])
    from safetensors.torch import load_file

    before, after = (load_file(str(f / "unet" / "diffusion_pytorch_model.safetensors")) for f in (base, tmp_path / "fer"))
    moved = float((after["class_embedding.linear_1.weight"] - before["class_embedding.linear_1.weight"]).abs().max())
    assert moved > 0  # the pooled embedding's path into the UNet trained
    _train(["au-adapter", *common, "--model", tmp_path / "fer", "--out", tmp_path / "fer"])
    _train(["calibrator", "--data", tmp_path / "fetext", "--model", tmp_path / "fer", "--out", tmp_path / "feranno", "--iters", 2,
            "--batch-size", 4, "--dim", 16, "--generator", "sd-pooled"])
    torch.jit.save(torch.jit.script(Clf()), str(tmp_path / "clf.ts"))

    from synfer.engine.pipeline import run_recipe
    from synfer.engine.recipe import load_recipe

    clf = {"plugin": "torch-checkpoint", "path": str(tmp_path / "clf.ts"), "label_space": "affectnet8", "size": 64}
    overrides = [f"output={tmp_path / 'out'}", "num_images=2", "generator.plugin=sd-pooled", f"generator.model={tmp_path / 'fer'}",
                 "generator.device=cpu", "generator.dtype=float32", "generator.steps=3", "generator.batch_size=2", "generator.chunk=2",
                 "generator.channels_last=false", f"generator.layout.source={tmp_path / 'fetext'}", f"guidance_classifier={clf}",
                 f"calibrator.weights={tmp_path / 'feranno'}", f"experts=[{clf}]", "vote.threshold=0", "evaluators=[]"]
    summary = run_recipe(load_recipe(Path(__file__).parent.parent / "recipes" / "sd15-affectnet8.yaml", overrides), progress=False)
    assert summary.generated == 2
    import json

    assert json.loads((tmp_path / "fer" / "model_index.json").read_text())["_class_name"] == "PooledTextPipeline"
    assert json.loads((tmp_path / "feranno" / "config.json").read_text())["generator_plugin"] == "sd-pooled"
    print(f"pooled backbone: {len(source)} lines; class embedding moved by up to {moved:.2e} in training")
