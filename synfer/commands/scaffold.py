"""`synfer plugin new NAME`: write a third-party plugin package that works and tests itself.

The skeleton is a guidance classifier (differentiable, logits out) that also votes as an
expert (`predict`, probabilities out): a small torch CNN whose weights ship inside the wheel
as package data, loaded lazily on first use. Its test registers the plugin the way synfer
does, checks the contract (shapes, logits with gradients, probabilities that sum to 1,
determinism) and validates a recipe that names it. docs/plugins.md explains every line.
"""
from __future__ import annotations

import re
from pathlib import Path

import click
import numpy as np

NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def names(name: str) -> dict[str, str]:
    """'my-fer' -> plugin my-fer, distribution synfer-my-fer, module synfer_my_fer, class MyFerClassifier."""
    if not NAME_RE.match(name):
        raise click.BadParameter(f"{name!r} is not a plugin name; expected lowercase words joined by '-', e.g. 'my-fer'")
    return {"name": name, "dist": f"synfer-{name}", "module": "synfer_" + name.replace("-", "_"),
            "cls": "".join(w.capitalize() for w in name.split("-")) + "Classifier"}


PYPROJECT = '''\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "A synfer plugin: the {name} FER classifier (guidance classifier and expert)."
requires-python = ">=3.10"
dependencies = ["synfer", "torch", "safetensors"]

[project.optional-dependencies]
test = ["pytest"]

# The one line that makes synfer find the plugin (`synfer plugins` lists it once installed).
[project.entry-points.synfer]
{name} = "{module}"

[tool.setuptools]
packages = ["{module}"]

# Weights ship inside the wheel, next to the code that reads them.
[tool.setuptools.package-data]
{module} = ["weights/*"]
'''

INIT = '''\
"""The {name} synfer plugin. No torch import here: `synfer --help` and `synfer plugins` stay fast."""
from synfer import hookimpl


@hookimpl
def register_stages(register):
    from {module}.classifier import {cls}

    register({cls})
'''

CLASSIFIER = '''\
"""{cls}: a FER classifier that steers generation (guidance_classifier) and votes (expert)."""
from __future__ import annotations

from importlib import resources

from synfer.stages import GuidanceClassifier, StageConfig, missing_path

CLASSES = 8  # affectnet8: neutral, happy, sad, surprise, fear, disgust, anger, contempt


def weights_file() -> str:
    """The weights shipped inside this package (package data, see pyproject.toml)."""
    return str(resources.files(__package__) / "weights" / "model.safetensors")


def build_net(width: int = 16):
    """A small CNN. Replace it with your architecture; keep forward() differentiable."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, width, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, CLASSES))


class {cls}(GuidanceClassifier):
    name = "{name}"
    label_space = "affectnet8"  # fixed when the class is defined: the core reads it before any weights load

    class Config(StageConfig):  # strict: a misspelled key in a recipe is an error
        weights: str | None = None  # a .safetensors state dict; None: the file shipped in this package
        size: int = 32  # the net's input side in pixels
        device: str = "cpu"

    @classmethod
    def problems(cls, config):
        """Checked by `synfer validate`: cheap, no torch, no weights loaded."""
        return missing_path(config, "weights", "a .safetensors file", "Leave it out to use the shipped weights.")

    def __init__(self, config=None):
        super().__init__(config)
        self._net = None  # weights load on first use, not when the recipe is validated

    def net(self):
        if self._net is None:
            from safetensors.torch import load_file

            net = build_net()
            net.load_state_dict(load_file(self.config.weights or weights_file()))
            # eval mode (no dropout/batch-norm updates); frozen weights: guidance needs grads w.r.t. images only
            self._net = net.to(self.config.device).eval().requires_grad_(False)
        return self._net

    def forward(self, images):
        """RGB float tensor (N, 3, H, W) in [-1, 1], any size -> logits (N, 8), differentiable."""
        import torch.nn.functional as F

        net = self.net()
        x = images.to(self.config.device, dtype=next(net.parameters()).dtype)
        if x.shape[-2:] != (self.config.size, self.config.size):
            x = F.interpolate(x, size=(self.config.size, self.config.size), mode="bilinear", align_corners=False)
        return net(x)

    # predict() is inherited: PIL images -> softmax probabilities (N, 8), so this classifier votes too.
'''

TEST = '''\
"""Tests for the {name} plugin: the contract synfer relies on (docs/plugins.md). Run: pytest tests/"""
import pytest
import torch

import {module}
from synfer.testing import check_stage, plugin_registry, sample_images


@pytest.fixture
def stage():
    reg = plugin_registry({module})  # only this plugin, registered as synfer registers it
    return reg.build("guidance_classifier", {{"plugin": "{name}"}})


def test_contract(stage):
    check_stage(stage)  # logits with gradients for guidance; probabilities for the vote; deterministic


def test_shapes_and_classes(stage):
    logits = stage.forward(torch.zeros(2, 3, 64, 64))  # any size: forward() resizes
    assert logits.shape == (2, 8)
    assert stage.predict(sample_images(3)).shape == (3, 8)


def test_registered_once_under_its_name():
    assert plugin_registry({module}).names("guidance_classifier") == ["{name}"]


def test_config_is_strict():
    from {module}.classifier import {cls}

    with pytest.raises(Exception, match="wieghts"):
        {cls}.Config(wieghts="x.safetensors")
    assert {cls}.problems({cls}.Config(weights="missing.safetensors"))
'''

README = '''\
# {dist}

A synfer plugin: `{name}`, a FER classifier usable as a
`guidance_classifier` (semantic guidance) and as an `expert` (label vote).

```bash
pip install -e .[test]
synfer plugins | grep {name}
pytest tests/
```

In a recipe:

```yaml
guidance_classifier:
  plugin: {name}
experts:
  - plugin: {name}
    weight: 1.0
```

Replace `build_net` in `{module}/classifier.py` with your network and
`{module}/weights/model.safetensors` with its trained state dict
(`safetensors.torch.save_file(net.state_dict(), ...)`). The shipped file holds a seeded
random initialisation, so the package works before it is trained.
'''


def initial_weights(width: int = 16, classes: int = 8, seed: int = 0) -> dict:
    """A seeded random state dict for the template's `build_net` (numpy: no torch needed here)."""
    rng = np.random.default_rng(seed)

    def conv(cout, cin):
        return (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)

    return {"0.weight": conv(width, 3), "0.bias": np.zeros(width, np.float32),
            "2.weight": conv(2 * width, width), "2.bias": np.zeros(2 * width, np.float32),
            "6.weight": (rng.standard_normal((classes, 2 * width)) / np.sqrt(2 * width)).astype(np.float32),
            "6.bias": np.zeros(classes, np.float32)}


def write_plugin(name: str, dest: str | Path = ".") -> Path:
    """Write the package `synfer-NAME/` under `dest`; returns its folder. Refuses to overwrite."""
    from safetensors.numpy import save_file  # heavy

    n = names(name)
    root = Path(dest) / n["dist"]
    if root.exists():
        raise click.ClickException(f"{root} already exists; pick another name or folder (--dir)")
    files = {"pyproject.toml": PYPROJECT, "README.md": README, f"{n['module']}/__init__.py": INIT,
             f"{n['module']}/classifier.py": CLASSIFIER, f"tests/test_{n['module']}.py": TEST}
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.format(**n))
    weights = root / n["module"] / "weights" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    save_file(initial_weights(), str(weights))
    return root


@click.group("plugin")
def plugin_cli():
    """Create a plugin package (list installed ones with `synfer plugins`)."""


@plugin_cli.command("new")
@click.argument("name")
@click.option("--dir", "dest", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Folder the package folder synfer-NAME is written into.")
def new_cmd(name, dest):
    """Write synfer-NAME/: a guidance classifier + expert, its Config, packaged weights and a passing test."""
    root = write_plugin(name, dest)
    click.echo(f"wrote {root}\nnext: pip install -e {root}[test] && pytest {root}/tests && synfer plugins")
