"""semantic_guidance.decoder: approx (issue 16 item 1): a small conv decoder distilled from the VAE by
`synfer train approx-decoder`, differentiable, close to the VAE decode at the classifier's size."""
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from synfer import labels as L  # noqa: E402
from synfer.commands.cli import main  # noqa: E402
from synfer.engine.dataset import read_metadata  # noqa: E402

from test_training import make_fetext  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64


class Clf:
    """A fixed differentiable 8-class 'classifier': mean colour -> logits."""

    label_space = "affectnet8"

    def forward(self, x):
        return x.mean(dim=(2, 3)) @ torch.linspace(-1, 1, 24).view(3, 8)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A narrow SD 1.5-topology model (random weights, 64 px: 8x8x4 latents) and its approx decoder, distilled on 24 faces."""
    from synfer_plugins.sd.testing import build_sd15

    root = tmp_path_factory.mktemp("approx")
    data = make_fetext(root / "fetext", n=24, size=SIZE)
    build_sd15(root / "model", [r["caption"] for r in read_metadata(data)] + ["", "a happy person"], "narrow", sample_size=SIZE)
    result = CliRunner().invoke(main, ["train", "approx-decoder", "--model", str(root / "model"), "--data", str(data), "--iters", "300",
                                       "--batch-size", "16", "--width", "32", "--log-interval", "100"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "held-out error" in result.output
    return root


@pytest.mark.slow
def test_approx_decoder_matches_the_vae_decode_at_classifier_size(distilled):
    import json

    from synfer_plugins.sd.approx_decoder import ApproxDecoder, decoder_error
    from synfer_plugins.sd.model import SDModel

    dec = ApproxDecoder.load(distilled / "model" / "approx_decoder")
    assert dec.size == 64 and json.loads((distilled / "model" / "approx_decoder" / "config.json").read_text())["heldout_images"] == 2
    sd = SDModel.from_pretrained(distilled / "model")
    from synfer_plugins.sd.training import FETextDataset

    ds = FETextDataset(distilled / "fetext", SIZE)
    with torch.no_grad():
        z = sd.encode_image(torch.stack([ds.image(i) for i in range(len(ds))]))
    err = decoder_error(dec, sd, z, 64)
    baseline = decoder_error(lambda x: torch.zeros(len(x), 3, 64, 64), sd, z, 64)  # predicting mid-grey everywhere
    print(err, baseline)
    # measured (2026-12-02): RMSE 0.299 against 0.336 for mid-grey. A random-weight VAE decoder is a chaotic function of
    # the latents (global GroupNorm, attention), so a small conv net distils little of it; on out/fetext-quick (922 faces,
    # 600 steps, width 64) the held-out RMSE is 0.294 against a target std of 0.323 (bench/README.md)
    assert err["rmse"] < 0.95 * baseline["rmse"] and err["rmse"] < 0.32


@pytest.mark.slow
def test_approx_decode_is_differentiable_and_guides(distilled):
    from synfer.stages import SampleRequest
    from synfer_plugins.sd.approx_decoder import ApproxDecoder
    from synfer_plugins.sd.generator import SDGenerator
    from synfer_plugins.sd.sampling import GuidanceConfig, SemanticGuidance

    dec = ApproxDecoder.load(distilled / "model" / "approx_decoder")
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    dec(z).square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # the weights are frozen, the latents get the gradient

    gen = SDGenerator(SDGenerator.Config(model=str(distilled / "model"), steps=4, channels_last=False))
    reqs = [SampleRequest(index=i, seed=i, expression=e, aus=None, prompt=f"a {e} person") for i, e in enumerate(["happy", "sad"])]
    text, aus = gen.conditions(reqs)
    x_t, t = gen.initial_latents(reqs), gen.timesteps()[2]
    ups = {}
    for decoder in ("vae", "approx"):
        sg = SemanticGuidance(gen, Clf(), reqs, aus, GuidanceConfig(start=0.0, lambda_g=1.0, decoder=decoder))
        ups[decoder] = sg(2, t, x_t, text) - text
        assert torch.allclose(ups[decoder].flatten(1).norm(dim=1), torch.ones(2), atol=1e-4)  # the text embedding got a gradient
    # No claim on direction here: on this random-weight VAE the approximation explains ~17% of the decode's variance, and the
    # two updates measured cosine -0.49 and below for a mean-colour classifier; judging it needs a trained latent model.


@pytest.mark.slow
def test_missing_approx_decoder_names_the_command(tmp_path, distilled):
    import shutil

    from synfer_plugins.sd.generator import SDGenerator
    from synfer_plugins.sd.sampling import GuidanceConfig, SemanticGuidance

    bare = tmp_path / "bare"
    shutil.copytree(distilled / "model", bare, ignore=shutil.ignore_patterns("approx_decoder"))
    gen = SDGenerator(SDGenerator.Config(model=str(bare), steps=4, channels_last=False))
    with pytest.raises(FileNotFoundError, match="synfer train approx-decoder --model"):
        SemanticGuidance(gen, Clf(), [], None, GuidanceConfig(decoder="approx"))
    # `synfer validate` says it before any weights load
    problems = SDGenerator.problems(SDGenerator.Config(model=str(bare), semantic_guidance={"decoder": "approx"}))
    assert any("synfer train approx-decoder --model" in p for p in problems), problems
    assert not [p for p in SDGenerator.problems(SDGenerator.Config(model=str(distilled / "model"), semantic_guidance={"decoder": "approx"}))
                if "approx" in p]


def test_validate_refuses_approx_on_a_pixel_space_model():
    from synfer_plugins.sd.generator import SDGenerator

    problems = SDGenerator.problems(SDGenerator.Config(semantic_guidance={"decoder": "approx"}))  # the shipped tiny model: no vae/
    assert any("pixel-space model" in p and "decoder=vae" in p for p in problems), problems
    assert not SDGenerator.problems(SDGenerator.Config())


@pytest.mark.slow
def test_gradient_term_passes_the_classifiers_gradient_as_the_vae_does(distilled, tmp_path):
    """--classifier: the decoder also learns J_approx^T v ~ J_vae^T v for the guidance classifier's gradient v, the
    quantity Eq. 6 reads. On the pairs it learned from, its cosine with the VAE's is near 1; the pixels-only decoder's is not."""
    import json

    from synfer.engine.registry import get_registry
    from synfer_plugins.sd.approx_decoder import ApproxDecoder, distillation_pairs, vjp_cosine
    from synfer_plugins.sd.model import SDModel
    from synfer_plugins.sd.training import FETextDataset

    out = tmp_path / "grad"
    result = CliRunner().invoke(main, ["train", "approx-decoder", "--model", str(distilled / "model"), "--data", str(distilled / "fetext"),
                                       "--iters", "300", "--batch-size", "16", "--width", "32", "--log-interval", "100",
                                       "--classifier", "tiny-cnn", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "gradient cosine with the VAE's" in result.output
    info = json.loads((out / "config.json").read_text())
    assert info["classifier"] == "tiny-cnn" and info["gradient_weight"] == 1.0 and "gradient_cosine" in info["heldout_error"]

    sd = SDModel.from_pretrained(distilled / "model", load_au_adapter=False)
    ds = FETextDataset(distilled / "fetext", SIZE)
    with torch.no_grad():
        z = sd.encode_image(torch.stack([ds.image(i) for i in range(22)]))  # the 22 training faces (2 held out)
    clf = get_registry().build("guidance_classifier", {"plugin": "tiny-cnn"})
    pairs = distillation_pairs(sd, z.numpy(), ds.captions[:22], SIZE, seed=0, classifier=clf)  # the training pairs (seed 0)
    cos = {name: float(vjp_cosine(ApproxDecoder.load(folder), pairs["latents"], pairs["v"], pairs["g"]).mean())
           for name, folder in (("pixels", distilled / "model" / "approx_decoder"), ("gradient", out))}
    # measured (2026-12-03): gradient 0.999, pixels 0.097. On fresh x0 estimates of this random-weight VAE (chaotic, 22 faces)
    # neither generalises (0.01 vs 0.12); on the trained latent model of bench/latent_world.py the held-out cosine went
    # 0.19 -> 0.38 and the guidance gain rose (bench/README.md)
    assert cos["gradient"] > 0.9 and cos["pixels"] < 0.5
