"""synfer.engine.logs: quiet by default (library noise hidden, each warning once), verbose on request."""
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from synfer.engine import logs

ROOT = Path(__file__).resolve().parents[1]
LIB_FILE = "/x/lib/python3.11/site-packages/diffusers/models/modeling_utils.py"
OWN_FILE = str(ROOT / "synfer" / "plugins.py")


@pytest.fixture
def restore():
    """setup() changes process-wide state: give every test the state it found."""
    env = dict(os.environ)
    for key in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        os.environ.pop(key, None)  # an earlier in-process CLI test may have set them (setup only sets defaults)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in (*logs.LIBRARIES, "synfer", "synfer_plugins")}
    with warnings.catch_warnings():
        yield
    os.environ.clear()
    os.environ.update(env)
    root.handlers[:], root.level = handlers, level
    for n, lv in levels.items():
        logging.getLogger(n).setLevel(lv)


def warn(message, filename, lineno=1, category=UserWarning):
    warnings.warn_explicit(message, category, filename, lineno)


def test_default_hides_library_warnings_and_prints_each_own_warning_once(restore, capsys):
    logs.setup(0)
    warnings.simplefilter("always")  # defeat Python's per-location registry: dedup must be ours
    warn("Cannot initialize model with low cpu memory usage because `accelerate` was not found", LIB_FILE)
    warn("torch.jit.script is deprecated", "/x/site-packages/torch/jit/_script.py", category=DeprecationWarning)
    warn("synfer plugin 'bad' failed to load", OWN_FILE, 10)
    warn("synfer plugin 'bad' failed to load", OWN_FILE, 20)  # same text from another line: still once
    warn("another note", OWN_FILE, 30)
    err = capsys.readouterr().err
    assert err == "warning: synfer plugin 'bad' failed to load\nwarning: another note\n"
    assert os.environ["DIFFUSERS_VERBOSITY"] == "error" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert logging.getLogger("mmengine").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("transformers").getEffectiveLevel() == logging.ERROR  # their warnings are advice


def test_verbose_shows_library_warnings_and_where(restore, capsys):
    logs.setup(1)
    warnings.simplefilter("always")
    warn("Cannot initialize model with low cpu memory usage", LIB_FILE, 7)
    warn("torch.jit.script is deprecated", "/x/site-packages/torch/jit/_script.py", category=DeprecationWarning)
    err = capsys.readouterr().err
    assert "warning (torch, DeprecationWarning): torch.jit.script is deprecated" in err
    assert err.startswith("warning (diffusers): Cannot initialize") and f"{LIB_FILE}:7" in err
    assert os.environ["DIFFUSERS_VERBOSITY"] == "info"
    assert logging.getLogger("diffusers").getEffectiveLevel() == logging.INFO
    assert logs.verbosity() == 1


def test_quiet_shows_errors_only(restore, capsys):
    logs.setup(-1)
    warnings.warn("a synfer warning")
    logging.getLogger("synfer.x").warning("a logged warning")
    logging.getLogger("synfer.x").error("an error")
    assert capsys.readouterr().err == "error: an error\n"


def test_user_settings_win(restore):
    os.environ["DIFFUSERS_VERBOSITY"] = "debug"
    logs.setup(0)
    assert os.environ["DIFFUSERS_VERBOSITY"] == "debug"


def test_library_of():
    assert logs._library_of(LIB_FILE) == "diffusers"
    assert logs._library_of("/v/lib/python3.11/site-packages/mmengine/runner/runner.py") == "mmengine"
    assert logs._library_of("/v/lib/python3.11/site-packages/synfer_acme/x.py") is None  # a plugin speaks for itself
    assert logs._library_of(OWN_FILE) is None


@pytest.mark.slow
def test_real_libraries_are_quiet_by_default(tmp_path):
    """The shipped UNet and CLIP text encoder load through diffusers/transformers without their banners."""
    script = (
        "from synfer.engine.logs import setup; setup(0)\n"
        "import warnings\n"
        "from diffusers import UNet2DConditionModel\n"
        "from transformers import CLIPTextModel\n"
        f"UNet2DConditionModel.from_pretrained(r'{ROOT}/plugins/models/tiny-sd', subfolder='unet', low_cpu_mem_usage=True)\n"
        f"CLIPTextModel.from_pretrained(r'{ROOT}/plugins/models/tiny-sd', subfolder='text_encoder')\n"
        "warnings.warn('from synfer'); warnings.warn('from synfer')\n"
        "print('done')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFUSERS_", "TRANSFORMERS_", "HF_HUB_DISABLE"))}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "done\n"
    assert run.stderr == "warning: from synfer\n", run.stderr


@pytest.mark.usefixtures("one_thread")
def test_training_console_is_one_bar_and_the_log_file_keeps_everything(restore, tmp_path, capfd):
    torch = pytest.importorskip("torch")
    pytest.importorskip("mmengine")
    from mmengine.model import BaseModel

    from synfer.engine.training import run_training

    class Regression(BaseModel):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, y, mode="loss"):
            return {"loss": torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)}

    g = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 4, generator=g)
    data = [{"x": x, "y": x.sum()} for x in xs]
    logs.setup(0)
    capfd.readouterr()
    result = run_training(Regression(), data, work_dir=tmp_path / "work", max_iters=20, batch_size=8, lr=0.05, log_interval=5)
    out, err = capfd.readouterr()
    assert result.iters == 20
    assert "Iter(train)" not in out + err and "System environment" not in out + err and "mmengine" not in out + err
    assert "train: 100%" in err and "20/20" in err and "loss=" in err
    log_files = list((tmp_path / "work").rglob("*.log"))
    assert log_files, "mmengine's log file is missing from the work folder"
    text = log_files[0].read_text()
    assert "System environment" in text and text.count("Iter(train)") == 4  # every log_interval of 5


def test_a_broken_plugin_is_warned_about_once(tmp_path):
    from conftest import make_dist, subprocess_env

    (tmp_path / "synfer_broken.py").write_text("raise RuntimeError('boom at import')\n")
    make_dist(tmp_path, "synfer-broken", {"broken": "synfer_broken"})
    # a new output: the repo's out/quickstart is make demo's, with another recipe.json
    for args in (["plugins"], ["validate", "recipes/quickstart.yaml", "generator.layout.enabled=false", "evaluators=[]", f"output={tmp_path / 'o'}"]):
        out = subprocess.run([sys.executable, "-m", "synfer", *args], capture_output=True, text=True, env=subprocess_env(tmp_path), cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert out.stderr.count("boom at import") == 1, out.stderr
        assert out.stderr.startswith("warning: synfer plugin 'broken'"), out.stderr


def test_log_lines_follow_the_current_stderr(restore, capsys):
    """After a click test runner swapped stderr and closed its copy, logging still reaches the real one."""
    from click.testing import CliRunner

    from synfer.commands.cli import main

    assert CliRunner().invoke(main, ["labels"]).exit_code == 0  # runs setup() under a swapped stderr
    logging.getLogger("synfer.x").warning("still visible")
    assert "warning: still visible" in capsys.readouterr().err


def test_a_second_setup_changes_what_the_first_set(restore):
    """In one process (click's test runner, a notebook) -v after a default setup() still turns libraries up."""
    os.environ.pop("DIFFUSERS_VERBOSITY", None)
    logs.setup(0)
    logs.setup(1)
    assert os.environ["DIFFUSERS_VERBOSITY"] == "info"
