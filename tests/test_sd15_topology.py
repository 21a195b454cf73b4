"""The SD 1.5 path on a random-weight model with SD 1.5's exact topology, narrow (issue 15).

4 UNet levels, 16 cross-attention blocks, a latent VAE (scaling 0.18215), a 768-wide CLIP text
encoder with a byte-level BPE tokenizer and 77 tokens; channel widths 32/64/64/64 so that every
stage runs in seconds at 64 px: `synfer train generator | au-adapter | calibrator`, then the
sd15-affectnet8 recipe (layout inversion, AU adapter, semantic guidance, FERAnno, experts, an
evaluator) in float32 and bfloat16, and the diffusers interop of what the trainings wrote.
"""
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from synfer import labels as L  # noqa: E402
from synfer.engine.dataset import DatasetWriter, read_metadata  # noqa: E402

ROOT = Path(__file__).parent.parent
SIZE = 64  # the smallest side an SD 1.5 topology takes: VAE x8, then 3 UNet downsamplings
CLASSES = ["neutral", "happy", "sad", "anger"]

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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """FEText (8 faces), the narrow SD 1.5 model, then the three trainings a lab runs, 2 steps each, sharing --out."""
    from PIL import Image

    from synfer_plugins.sd.testing import build_sd15

    root = tmp_path_factory.mktemp("sd15")
    w = DatasetWriter(root / "fetext")
    rng = np.random.default_rng(0)
    for i, e in enumerate(CLASSES * 2):
        aus = L.au_dict(L.sample_aus(e, i))
        w.write(i, Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)),
                {"expression": e, "aus": aus, "caption": f"a photo of a {e} person, the face looks {e}"})
    captions = [r["caption"] for r in read_metadata(root / "fetext")] + ["a photo of a person"]
    build_sd15(root / "base", captions, "narrow", sample_size=SIZE)
    common = ["--data", root / "fetext", "--iters", 2, "--batch-size", 2, "--log-interval", 1, "--checkpoint-interval", 2]
    _train(["generator", *common, "--model", root / "base", "--out", root / "sd15-fer"])
    _train(["au-adapter", *common, "--model", root / "sd15-fer", "--out", root / "sd15-fer"])
    _train(["calibrator", "--data", root / "fetext", "--model", root / "sd15-fer", "--out", root / "feranno", "--iters", 2,
            "--batch-size", 4, "--dim", 16])
    torch.jit.save(torch.jit.script(Clf()), str(root / "clf.ts"))
    return root


def test_topology_is_sd15(world):
    from diffusers import StableDiffusionPipeline

    from synfer_plugins.sd.testing import count_cross_attention

    pipe = StableDiffusionPipeline.from_pretrained(str(world / "base"))
    assert len(pipe.unet.config.block_out_channels) == 4 and count_cross_attention(pipe.unet) == 16
    assert pipe.unet.config.cross_attention_dim == 768 == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.latent_channels == 4 and pipe.vae.config.scaling_factor == 0.18215
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer" and pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer(["a photo of a happy person"], padding="max_length", max_length=77).input_ids[0]
    assert len(ids) == 77 and pipe.tokenizer.convert_ids_to_tokens(ids[5]) == "happy</w>"  # caption words are single BPE tokens
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("zebra").input_ids[1:-1])[-1].endswith("</w>")  # unseen words still encode


def test_trainings_keep_their_own_work_folders(world):
    """generator and au-adapter share --out: each checkpoints into OUT/work/<kind>, neither clobbers the other."""
    from synfer.engine.training import RUN_KIND_FILE, kind_work_dir

    work = world / "sd15-fer" / "work"
    for kind in ("generator", "au-adapter"):
        assert (work / kind / RUN_KIND_FILE).read_text().strip() == kind
        assert (work / kind / "iter_2.pth").exists() and "iter_2.pth" in (work / kind / "last_checkpoint").read_text()
    assert (world / "feranno" / "work" / "calibrator" / RUN_KIND_FILE).exists()
    with pytest.raises(Exception, match="'generator' training, not 'au-adapter'"):
        kind_work_dir(world / "sd15-fer", "au-adapter", work_dir=work / "generator")


def test_trained_folder_loads_in_diffusers_and_ip_adapter_reproduces_au_conditioning(world):
    """`StableDiffusionPipeline.from_pretrained` + `load_ip_adapter` on what synfer wrote give synfer's own samples."""
    from diffusers import StableDiffusionPipeline

    from synfer.stages import SampleRequest
    from synfer_plugins.sd.generator import SDGenerator

    folder = world / "sd15-fer"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    gen = SDGenerator(SDGenerator.Config(model=str(folder), steps=3, guidance_scale=4.0, au_scale=1.0, channels_last=False,
                                         forward_dtype=None))  # float32 throughout, as the pipeline runs
    m = gen.load()
    assert m.au_adapter is not None and not any(p.requires_grad for p in m.unet.parameters())  # frozen at load
    with torch.no_grad():  # a visible AU branch: the 2-step adapter starts as a copy of the UNet's key/values, so scale it up
        for proc in m.au_adapter.attn.values():
            proc.to_v_ip[0].weight.mul_(20)
    m.au_adapter.save(folder / "scaled")
    reqs = [SampleRequest(index=i, seed=100 + i, expression=e, aus=L.au_dict(L.sample_aus(e, i)), prompt=f"a photo of a {e} person")
            for i, e in enumerate(["happy", "sad"])]
    x_T = gen.initial_latents(reqs)
    text, aus = gen.conditions(reqs)
    ours = gen.denoise(x_T.clone(), text, aus)
    no_au = gen.denoise(x_T.clone(), text, torch.zeros_like(aus))

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(folder / "scaled"), subfolder="ip_adapter", weight_name="ip-adapter-au.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(1.0)
    # one prompt per call: diffusers repeats the given embeds for every prompt of a batch; unconditional half first (zero AUs)
    embeds = [[torch.cat([torch.zeros_like(aus[i:i + 1]), aus[i:i + 1]])[:, None, :]] for i in range(len(reqs))]
    theirs = torch.cat([pipe(r.prompt, negative_prompt="", num_inference_steps=3, guidance_scale=4.0, latents=x_T[i:i + 1].clone(),
                             ip_adapter_image_embeds=embeds[i], output_type="latent").images for i, r in enumerate(reqs)])
    au_effect = float((ours - no_au).abs().mean())
    print(f"AU effect {au_effect:.4f}, diffusers vs synfer max abs difference {float((ours - theirs).abs().max()):.2e}")
    assert au_effect > 1e-2  # the AU vector matters ...
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)  # ... and diffusers applies it exactly as synfer does
    images = pipe(reqs[0].prompt, num_inference_steps=2, guidance_scale=1.0, ip_adapter_image_embeds=[aus[:1, None]], output_type="np").images
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()


def test_micro_batched_guidance_gives_the_one_pass_update(world):
    from synfer.stages import SampleRequest
    from synfer_plugins.sd.generator import SDGenerator
    from synfer_plugins.sd.sampling import GuidanceConfig, SemanticGuidance
    from synfer_plugins.torch_checkpoint import TorchCheckpoint

    gen = SDGenerator(SDGenerator.Config(model=str(world / "sd15-fer"), steps=4, channels_last=False))
    clf = TorchCheckpoint(TorchCheckpoint.Config(path=str(world / "clf.ts"), label_space="affectnet8", size=SIZE))
    reqs = [SampleRequest(index=i, seed=i, expression=e, aus=L.au_dict(L.sample_aus(e, i)), prompt=f"a {e} person")
            for i, e in enumerate(["happy", "sad", "anger"])]
    gen.load().to(dtype=torch.float64)  # float64: the update of a random-weight model is ill-conditioned enough that float32
    # rounding alone moves it by up to 3e-4 depending on the trained weights; in float64 the passes agree to ~5e-9
    text, aus = gen.conditions(reqs)
    x_t = gen.initial_latents(reqs).double()
    text, aus = text.double(), aus.double() if aus is not None else None
    t = gen.timesteps()[2]
    updates = {}
    for mb in (None, 1, 2):
        sg = SemanticGuidance(gen, clf, reqs, aus, GuidanceConfig(start=0.0, lambda_g=1.0, micro_batch=mb))
        updates[mb] = sg(2, t, x_t, text) - text
    assert torch.allclose(updates[None].flatten(1).norm(dim=1).float(), torch.ones(3), atol=1e-4)  # Eq. 6: a step of lambda_g per sample
    for mb in (1, 2):
        assert torch.allclose(updates[mb], updates[None], atol=1e-4, rtol=1e-4), float((updates[mb] - updates[None]).abs().max())
    # reuse_forward: the same update, and the conditional noise the step's denoising would have predicted before it
    c, eps = SemanticGuidance(gen, clf, reqs, aus, GuidanceConfig(start=0.0, lambda_g=1.0, micro_batch=2, reuse_forward=True))(2, t, x_t, text)
    with torch.no_grad():
        m = gen.load()
        eps_ref = m.predict_noise(m.scheduler.scale_model_input(x_t, t), t, text, aus)
    assert torch.allclose(c - text, updates[None], atol=1e-4, rtol=1e-4) and torch.allclose(eps, eps_ref, atol=1e-8)


def test_feranno_reads_all_16_maps_grouped_by_scale(world):
    from synfer_plugins.feranno.capture import UNetCapture, align_capture, noise_to_t1
    from synfer_plugins.sd.generator import SDGenerator

    gen = SDGenerator(SDGenerator.Config(model=str(world / "sd15-fer"), channels_last=False))
    m = gen.load()
    with torch.no_grad(), UNetCapture(m.unet) as cap:
        x_t, ts = noise_to_t1(gen, torch.zeros(1, 3, SIZE, SIZE), [0])
        m.predict_noise(x_t, ts, m.encode_text(["a photo of a person"]))
        assert len(cap.store.maps) == 16
        feats, att = cap.collect()
    assert [f.shape[-1] for f in feats] == [1, 2, 4, 8] and sorted(att) == [1, 2, 4, 8]  # the latent is 8x8
    f, a = align_capture(feats, att, max_res=4)
    assert [v.shape[-1] for v in f] == [1, 2, 4, 4] and [v.shape[1] for v in a] == [77] * 4
    assert torch.allclose(a[3], torch.nn.functional.adaptive_avg_pool2d(att[8], 4))  # the finest scale reads its own maps
    _, legacy = align_capture(feats, att, max_res=4, read="nearest")
    assert torch.allclose(legacy[3], att[4])  # the old reading: the coarser maps nearest to the pooled side
    cfg = json.loads((world / "feranno" / "config.json").read_text())
    assert cfg["attention"] == "scale" and cfg["num_scales"] == 4 and cfg["max_res"] == 8  # default: min(16, latent side)


@pytest.mark.parametrize("dtype, forward", [("float32", None), ("bfloat16", None), ("float32", "bfloat16")])
def test_sd15_recipe_on_the_narrow_sd15_topology(world, tmp_path, dtype, forward):
    from PIL import Image

    summary, rows = _run_recipe(world, tmp_path / "out", dtype, "cpu", [f"generator.forward_dtype={forward or 'null'}"])
    assert rows[0]["generator"].get("forward_dtype") == forward
    assert summary.generated == 2 and len(rows) == 2
    row = rows[0]
    assert set(row["predictions"]) == {"feranno", "torch-checkpoint", "torch-checkpoint#2"}
    assert row["semantic_guidance"]["lambda_g"] == 0.1 and row["layout_init"]["depth"] == 0.7 and row["generator"]["au_scale"] == 1.0
    assert all(np.isclose(sum(r["soft_label"]), 1, atol=1e-4) for r in rows)
    assert summary.metrics["fer_accuracy_n"] == 2 and 0 <= summary.metrics["fer_accuracy"] <= 1
    with Image.open(tmp_path / "out" / row["file_name"]) as im:
        assert im.size == (SIZE, SIZE)


def test_layout_bank_on_the_sd15_topology(world, tmp_path, monkeypatch):
    """The inverted VAE latents of the layout faces go to the source's bank (bfloat16 too); a second run inverts
    nothing and writes the same files."""
    from safetensors.torch import load_file

    import synfer_plugins.sd.sampling as sampling

    for dtype in ("float32", "bfloat16"):
        _run_recipe(world, tmp_path / f"{dtype}-1", dtype, "cpu")
        with monkeypatch.context() as m:
            m.setattr(sampling, "invert", lambda *a, **k: pytest.fail("a banked face was inverted again"))
            _run_recipe(world, tmp_path / f"{dtype}-2", dtype, "cpu")
        first, second = read_metadata(tmp_path / f"{dtype}-1"), read_metadata(tmp_path / f"{dtype}-2")
        assert [r["file_name"] for r in first] == [r["file_name"] for r in second] and len(first) == 2
        for r in first:
            assert (tmp_path / f"{dtype}-1" / r["file_name"]).read_bytes() == (tmp_path / f"{dtype}-2" / r["file_name"]).read_bytes()
    banks = sorted((world / "fetext" / "work").glob("layout-*"))
    assert len(banks) >= 2  # one per dtype: the key holds every setting the bytes depend on
    x = load_file(str(next(banks[0].glob("*.safetensors"))))["x_t"]
    assert x.shape == (4, SIZE // 8, SIZE // 8)  # a VAE latent, not pixels


def _run_recipe(world, out, dtype, device, extra=()):
    from synfer.engine.pipeline import run_recipe
    from synfer.engine.recipe import load_recipe

    clf = {"plugin": "torch-checkpoint", "path": str(world / "clf.ts"), "label_space": "affectnet8", "size": SIZE}
    overrides = [f"output={out}", "num_images=2", f"generator.model={world / 'sd15-fer'}", f"generator.dtype={dtype}",
                 f"generator.device={device}", "generator.steps=3", "generator.batch_size=2", "generator.chunk=2", "generator.channels_last=false", "vote.threshold=0",
                 f"generator.layout.source={world / 'fetext'}", "generator.semantic_guidance.micro_batch=1",
                 f"guidance_classifier={clf}", f"calibrator.weights={world / 'feranno'}", f"experts=[{clf}, {dict(clf, weight=2.0)}]",
                 f"evaluators=[{{plugin: fer-accuracy, judge: {clf}}}]", *extra]
    summary = run_recipe(load_recipe(ROOT / "recipes" / "sd15-affectnet8.yaml", overrides), progress=False)
    return summary, read_metadata(out)


@pytest.mark.gpu
def test_sd15_recipe_on_cuda(world, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    summary, rows = _run_recipe(world, tmp_path / "out", "bfloat16", "cuda")
    print(f"cuda: {summary.generated} generated, metrics {summary.metrics}, first row predictions {rows[0]['predictions']}")
    assert summary.generated == 2 and len(rows) == 2
    assert set(rows[0]["predictions"]) == {"feranno", "torch-checkpoint", "torch-checkpoint#2"}
