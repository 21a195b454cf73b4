"""synfer.engine.training (mmengine Runner) and `synfer train generator / au-adapter / vae` on tiny data."""
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mmengine")

from click.testing import CliRunner  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402

from synfer.labels import au_dict, sample_aus  # noqa: E402
from synfer.commands.cli import main  # noqa: E402
from synfer.engine.training import TrainResult, latest_checkpoint, run_training  # noqa: E402

EXPRESSIONS = ("happy", "sad", "surprise", "neutral")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_fetext(root: Path, n: int = 24, size: int = 48) -> Path:
    """A tiny FEText folder: cartoon faces whose mouth shows the expression, with captions and AUs."""
    from PIL import Image, ImageDraw

    from synfer.engine.dataset import DatasetWriter

    rng = np.random.default_rng(0)
    w = DatasetWriter(root)
    for i in range(n):
        e = EXPRESSIONS[i % 4]
        im = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(40, 90, 3)))
        d = ImageDraw.Draw(im)
        s = size / 64
        d.ellipse((8 * s, 6 * s, size - 8 * s, size - 4 * s), fill=(220, 180, 150))
        d.ellipse((20 * s, 22 * s, 26 * s, 28 * s), fill=(30, 30, 30))
        d.ellipse((38 * s, 22 * s, 44 * s, 28 * s), fill=(30, 30, 30))
        mouth = {"happy": lambda: d.arc((20 * s, 34 * s, 44 * s, 50 * s), 10, 170, fill=(120, 20, 20), width=3),
                 "sad": lambda: d.arc((20 * s, 42 * s, 44 * s, 58 * s), 190, 350, fill=(120, 20, 20), width=3),
                 "surprise": lambda: d.ellipse((27 * s, 38 * s, 37 * s, 52 * s), fill=(90, 10, 10)),
                 "neutral": lambda: d.line((22 * s, 45 * s, 42 * s, 45 * s), fill=(120, 20, 20), width=3)}
        mouth[e]()
        w.write(i, im, {"caption": f"a photo of a {e} face, the person looks {e}", "aus": au_dict(sample_aus(e, i)),
                        "expression": e, "identity": f"id{i % 5}", "source": "test"})
    return root


class Regression(BaseModel):
    """y = w . x: the smallest model with a loss for the generic entry."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, y, mode="loss"):
        loss = torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)
        return {"loss": loss} if mode == "loss" else self.lin(x)


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_generic_entry_trains_and_resumes(tmp_path):
    kw = dict(work_dir=tmp_path / "run", batch_size=8, lr=0.3, checkpoint_interval=5, log_interval=5, seed=1, lr_schedule="constant")
    first = run_training(Regression(), Pairs(), max_iters=10, **kw)
    assert isinstance(first, TrainResult) and first.iters == 10
    assert [i for i, _ in first.losses] == list(range(1, 11))
    assert np.mean([l for _, l in first.losses[-3:]]) < 0.5 * np.mean([l for _, l in first.losses[:3]])
    assert latest_checkpoint(tmp_path / "run").name == "iter_10.pth"
    # resume (torch >= 2.6 checkpoint trap handled): continues at 11, with the weights of iteration 10
    model = Regression()
    second = run_training(model, Pairs(), max_iters=14, resume=True, **kw)
    assert [i for i, _ in second.losses] == [11, 12, 13, 14] and second.iters == 14
    assert second.losses[0][1] < first.losses[0][1]


def test_ema_weights_are_deployed(tmp_path):
    model = Regression()
    res = run_training(model, Pairs(), work_dir=tmp_path / "ema", max_iters=6, batch_size=8, lr=0.05, ema_momentum=0.5, log_interval=3)
    ckpt = torch.load(latest_checkpoint(tmp_path / "ema"), weights_only=False)
    # mmengine stores the EMA weights as the checkpoint's state_dict: the returned model holds the same
    assert torch.allclose(res.model.lin.weight, ckpt["state_dict"]["lin.weight"])


def test_expression_map_finds_the_mouth(tmp_path):
    from synfer_plugins.sd.training import FETextDataset, expression_map

    ds = FETextDataset(make_fetext(tmp_path / "fetext", n=24), 32)
    emap = expression_map(ds, 16)
    assert emap.shape == (16, 16) and float(emap.min()) >= 0 and float(emap.max()) == pytest.approx(1.0)
    mouth, eyes, background = float(emap[9:14, 5:11].mean()), float(emap[5:7, 5:11].mean()), float(emap[:3, :3].mean())
    print(f"expression map: mouth {mouth:.3f}, eyes {eyes:.3f}, background {background:.3f}")
    assert mouth > 2 * eyes and mouth > 2 * background  # only the mouth shows the expression in these faces


@pytest.mark.parametrize("weights", [{}, {"focus": 10.0, "snr_gamma": 5.0}], ids=["plain", "focus+min-snr"])
def test_diffusion_loss_falls_through_mmengine(tmp_path, weights):
    from synfer_plugins.sd.model import create_tiny_model
    from synfer_plugins.sd.training import DiffusionTrainModel, FETextDataset, expression_map

    data = make_fetext(tmp_path / "fetext", n=16)
    sd = create_tiny_model(["a photo of a happy face"], size=16, block_out_channels=(16, 32), text_dim=32, max_length=16)
    ds = FETextDataset(data, 16, sd.tokenize)
    pixel_weight = 1 + weights["focus"] * expression_map(ds, 16) if weights else None
    model = DiffusionTrainModel(sd, train_unet=True, train_text_encoder=True, train_adapter=False, pixel_weight=pixel_weight,
                                snr_gamma=weights.get("snr_gamma"))
    batch = {k: torch.stack([ds[i][k] for i in range(16)]) for k in ("pixel_values", "aus", "input_ids")}

    def eval_loss():
        model.eval()
        torch.manual_seed(123)  # same noise and timesteps before and after
        with torch.no_grad():
            return float(np.mean([float(model(**batch)["loss"]) for _ in range(4)]))

    before = eval_loss()
    run_training(model, ds, work_dir=tmp_path / "w", max_iters=40, batch_size=8, lr=2e-3, log_interval=20)
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def test_cli_generator_au_adapter_vae_then_generate(tmp_path):
    from synfer.stages import SampleRequest
    from synfer_plugins.sd.generator import SDGenerator

    data = make_fetext(tmp_path / "fetext", n=12)
    cli = CliRunner()
    common = ["--data", str(data), "--batch-size", "4", "--log-interval", "1", "--threads", "1"]
    r = cli.invoke(main, ["train", "generator", "--out", str(tmp_path / "gen"), "--iters", "2", *common])
    assert r.exit_code == 0, r.output
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler", "synfer_model.json"):
        assert (tmp_path / "gen" / sub).exists(), sub
    assert latest_checkpoint(tmp_path / "gen" / "work" / "generator").name == "iter_2.pth"  # its own work folder

    r = cli.invoke(main, ["train", "au-adapter", "--model", str(tmp_path / "gen"), "--out", str(tmp_path / "gen"), "--iters", "2", "--expression-focus", "5", "--snr-gamma", "5", *common])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "gen" / "au_adapter.safetensors").exists()
    trained_with = json.loads((tmp_path / "gen" / "au_adapter.json").read_text())["trained_with"]
    assert trained_with["iters"] == 2 and trained_with["loss_weights"] == {"expression_focus": 5.0, "snr_gamma": 5.0}

    r = cli.invoke(main, ["train", "vae", "--model", str(tmp_path / "gen"), "--out", str(tmp_path / "v")])
    assert r.exit_code == 0 and "skipped" in r.output

    g = SDGenerator(SDGenerator.Config(model=str(tmp_path / "gen"), steps=3, device="cpu"))
    out = g.generate([SampleRequest(index=0, seed=7, expression="happy", aus=au_dict(sample_aus("happy", 0)), prompt="a happy face")])
    assert g.au_adapter is not None and out[0].image.size == (32, 32)


def test_cli_generator_channels_sets_the_tiny_models_width(tmp_path):
    """--channels builds the tiny model from scratch at another width (issue 18's capacity probe); bad values and a
    --model to fine-tune are refused before any training, with what was expected."""
    data = make_fetext(tmp_path / "fetext", n=8)
    cli = CliRunner()
    common = ["--data", str(data), "--batch-size", "4", "--threads", "1", "--iters", "1", "--size", "16"]
    r = cli.invoke(main, ["train", "generator", "--out", str(tmp_path / "half"), "--channels", "16,32", *common])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "half" / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == [16, 32] and config["sample_size"] == 16

    for bad in ("12,32", "32", "a,b", "0,16"):
        r = cli.invoke(main, ["train", "generator", "--out", str(tmp_path / "x"), "--channels", bad, *common])
        assert r.exit_code == 2 and "multiples of 8" in r.output, (bad, r.output)
    r = cli.invoke(main, ["train", "generator", "--out", str(tmp_path / "y"), "--model", str(tmp_path / "half"), "--channels", "16,32", *common])
    assert r.exit_code == 2 and "from scratch" in r.output, r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y" / "unet").exists()

