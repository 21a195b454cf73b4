"""SD 2.x (v-prediction) and SDXL through every stage, on narrow random-weight folders built here (issue 39).

For each family: `synfer train generator | au-adapter | calibrator` (2 steps each), then the sd15-affectnet8
recipe's method (layout inversion, AU adapter, semantic guidance, FERAnno, expert voting) on what they wrote;
what the trainings wrote loads in that family's diffusers pipeline, and SDXL's sampling (pooled embedding, time
ids, AU adapter through `load_ip_adapter`) matches `StableDiffusionXLPipeline`'s on the same weights.
"""
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from synfer import labels as L  # noqa: E402
from synfer.engine.dataset import DatasetWriter, read_metadata  # noqa: E402

ROOT = Path(__file__).parent.parent
SIZE = 64
CLASSES = ["neutral", "happy", "sad", "anger"]
PIPELINES = {"sd2v": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}

pytestmark = pytest.mark.usefixtures("one_thread")


class Clf(torch.nn.Module):
    """A fixed differentiable 8-class 'classifier' (mean colour -> logits), saved as TorchScript."""

    def forward(self, x):
        return x.mean(dim=(2, 3)) @ torch.linspace(-1, 1, 24, device=x.device, dtype=x.dtype).view(3, 8)


def _train(args):
    from click.testing import CliRunner

    from synfer.commands.cli import main

    result = CliRunner().invoke(main, ["train", *map(str, args)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.fixture(scope="module", params=list(PIPELINES))
def world(request, tmp_path_factory):
    """FEText (8 faces), the family's narrow base folder, then generator (LoRA for SDXL), AU adapter and FERAnno."""
    from PIL import Image

    from synfer_plugins.sd.testing import build_sd2, build_sdxl

    family = request.param
    root = tmp_path_factory.mktemp(family)
    w = DatasetWriter(root / "fetext")
    rng = np.random.default_rng(0)
    for i, e in enumerate(CLASSES * 2):
        w.write(i, Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)),
                {"expression": e, "aus": L.au_dict(L.sample_aus(e, i)), "caption": f"a photo of a {e} person, the face looks {e}"})
    captions = [r["caption"] for r in read_metadata(root / "fetext")] + ["a photo of a person"]
    (build_sdxl if family == "sdxl" else build_sd2)(root / "base", captions, sample_size=SIZE)
    common = ["--data", root / "fetext", "--iters", 2, "--batch-size", 2, "--log-interval", 1, "--checkpoint-interval", 2]
    lora = ["--lora-rank", 4] if family == "sdxl" else []
    _train(["generator", *common, "--model", root / "base", "--out", root / "fer", *lora])
    _train(["au-adapter", *common, "--model", root / "fer", "--out", root / "fer"])
    _train(["calibrator", "--data", root / "fetext", "--model", root / "fer", "--out", root / "feranno", "--iters", 2,
            "--batch-size", 4, "--dim", 16, "--generator", "sd"])
    torch.jit.save(torch.jit.script(Clf()), str(root / "clf.ts"))
    return family, root


def test_trained_folder_loads_in_its_family_pipeline(world):
    import diffusers

    family, root = world
    folder = root / "fer"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family]
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(str(folder))
    if family == "sd2v":
        assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.text_encoder.config.hidden_size == 1024
    else:  # the folder keeps its own sampler, and the LoRA file loads where diffusers reads it
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and pipe.text_encoder_2 is not None
        base = getattr(diffusers, PIPELINES[family]).from_pretrained(str(root / "base"))
        base.load_lora_weights(str(folder / "lora"))
        assert any("lora" in n for n, _ in base.unet.named_parameters())
    pipe.load_ip_adapter(str(folder), subfolder="ip_adapter", weight_name="ip-adapter-au.safetensors", image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    au = torch.rand(1, len(L.AU_KEYS))
    images = pipe("a photo of a happy person", num_inference_steps=2, guidance_scale=1.0, ip_adapter_image_embeds=[au[:, None]],
                  output_type="np").images
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()


def test_sdxl_sampling_matches_the_diffusers_pipeline(world):
    """Pooled embedding, time ids, zero negative conditioning (force_zeros_for_empty_prompt), CFG and AU adapter
    applied as StableDiffusionXLPipeline applies them, on the same weights and starting noise."""
    family, root = world
    if family != "sdxl":
        pytest.skip("SDXL only: SD 2.x runs through StableDiffusionPipeline, as SD 1.5 does (test_sd15_topology)")
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from synfer.stages import SampleRequest
    from synfer_plugins.sd.generator import SDGenerator

    folder = root / "fer"
    gen = SDGenerator(SDGenerator.Config(model=str(folder), steps=3, guidance_scale=4.0, channels_last=False, forward_dtype=None))
    m = gen.load()
    with torch.no_grad():  # a visible AU branch (the 2-step adapter starts as a copy of the UNet's key/values)
        for proc in m.au_adapter.attn.values():
            proc.to_v_ip[0].weight.mul_(20)
    m.au_adapter.save(root / "scaled")
    req = SampleRequest(index=0, seed=7, expression="happy", aus=L.au_dict(L.sample_aus("happy", 0)), prompt="a photo of a happy person")
    x_T = gen.initial_latents([req])
    text, aus = gen.conditions([req])
    ours = gen.denoise(x_T.clone(), text, aus)
    no_au = gen.denoise(x_T.clone(), text, torch.zeros_like(aus))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(root / "scaled"), subfolder="ip_adapter", weight_name="ip-adapter-au.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(1.0)
    theirs = pipe(req.prompt, num_inference_steps=3, guidance_scale=4.0, latents=x_T.clone(),
                  ip_adapter_image_embeds=[torch.cat([torch.zeros_like(aus), aus])[:, None, :]], output_type="latent").images
    diff = float((ours - theirs).abs().max())
    print(f"SDXL: AU effect {float((ours - no_au).abs().mean()):.4f}, synfer vs diffusers max abs difference {diff:.2e}")
    assert float((ours - no_au).abs().mean()) > 1e-2 and torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_guidance_moves_the_pooled_embedding_with_the_text(world):
    """Eq. 6 acts on the whole conditioning: for SDXL its pooled-embedding tokens move too."""
    family, root = world
    from synfer.stages import SampleRequest
    from synfer_plugins.sd.generator import SDGenerator
    from synfer_plugins.sd.sampling import GuidanceConfig, SemanticGuidance
    from synfer_plugins.torch_checkpoint import TorchCheckpoint

    gen = SDGenerator(SDGenerator.Config(model=str(root / "fer"), steps=4, channels_last=False))
    clf = TorchCheckpoint(TorchCheckpoint.Config(path=str(root / "clf.ts"), label_space="affectnet8", size=SIZE))
    reqs = [SampleRequest(index=i, seed=i, expression=e, aus=L.au_dict(L.sample_aus(e, i)), prompt=f"a {e} person")
            for i, e in enumerate(["happy", "sad"])]
    text, aus = gen.conditions(reqs)
    m = gen.load()
    t = gen.timesteps()[2]
    step = SemanticGuidance(gen, clf, reqs, aus, GuidanceConfig(start=0.0, lambda_g=1.0))(2, t, gen.initial_latents(reqs), text) - text
    assert torch.allclose(step.flatten(1).norm(dim=1), torch.ones(2), atol=1e-4)  # Eq. 6: a step of lambda_g per sample
    extra = step[:, m.max_length:]
    if family == "sdxl":
        assert text.shape[1] == m.max_length + 1 and float(extra.abs().sum()) > 0  # the pooled token moved
        assert float(extra.flatten(1)[:, m.pooled_dim:].abs().sum()) == 0  # its zero padding did not
    else:
        assert text.shape[1] == m.max_length and extra.numel() == 0


def test_the_method_runs_on_the_family(world, tmp_path):
    from synfer.engine.pipeline import run_recipe
    from synfer.engine.recipe import load_recipe

    family, root = world
    clf = {"plugin": "torch-checkpoint", "path": str(root / "clf.ts"), "label_space": "affectnet8", "size": SIZE}
    overrides = [f"output={tmp_path / 'out'}", "num_images=2", f"generator.model={root / 'fer'}", "generator.dtype=float32",
                 "generator.device=cpu", "generator.steps=3", "generator.batch_size=2", "generator.chunk=2", "generator.channels_last=false",
                 "generator.scheduler=dpm++", "generator.layout.inversion_steps=1", "vote.threshold=0",
                 f"generator.layout.source={root / 'fetext'}", "generator.semantic_guidance.micro_batch=1", f"guidance_classifier={clf}",
                 f"calibrator.weights={root / 'feranno'}", f"experts=[{clf}]", f"evaluators=[{{plugin: fer-accuracy, judge: {clf}}}]"]
    summary = run_recipe(load_recipe(ROOT / "recipes" / "sd15-affectnet8.yaml", overrides), progress=False)
    rows = read_metadata(tmp_path / "out")
    assert summary.generated == 2 and len(rows) == 2
    assert set(rows[0]["predictions"]) == {"feranno", "torch-checkpoint"} and rows[0]["layout_init"]["depth"] == 0.7
    assert rows[0]["semantic_guidance"]["lambda_g"] == 0.1 and rows[0]["generator"]["au_scale"] == 1.0
    assert all(np.isclose(sum(r["soft_label"]), 1, atol=1e-4) for r in rows)
    cfg = json.loads((root / "feranno" / "config.json").read_text())
    assert cfg["tokens"] == 77 and cfg["num_scales"] == (3 if family == "sdxl" else 4)  # FERAnno read the family's own UNet
