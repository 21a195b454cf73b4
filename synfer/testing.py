"""A small harness for testing a synfer plugin, in the spirit of pytest's `pytester`.

    from synfer.testing import plugin_registry, check_stage
    reg = plugin_registry(synfer_acme)            # only your module, loaded as synfer loads it
    stage = reg.build("expert", {"plugin": "acme-brightness"})
    check_stage(stage)                            # the contract the core relies on, or an AssertionError saying what broke

`check_stage` knows what each stage kind must return (docs/plugins.md): experts probabilities
(N, classes) of their label space, guidance classifiers differentiable logits, evaluators a
dict of numbers. Images come from `sample_images`, seeded, so a failure reproduces.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from synfer.contract.labels import label_space
from synfer.engine.registry import Registry


def plugin_registry(*modules, installed: bool = False):
    """A fresh Registry holding `modules` (each registered as its own provider), plus the
    installed entry points when `installed` is true. Registration errors raise as they would in synfer."""
    reg = Registry()
    if installed:
        reg.load_entrypoints(strict=True)
    for m in modules:
        reg.add(m, provider=getattr(m, "__name__", None))
    return reg


def sample_images(n: int = 4, size: int = 64, seed: int = 0):
    """`n` seeded RGB PIL images of side `size`: smooth blobs, not noise, so classifiers see structure."""
    from PIL import Image  # heavy

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = np.zeros((size, size, 3))
        for _ in range(4):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
            img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(0, 1, 3)
        out.append(Image.fromarray((255 * img / img.max()).astype(np.uint8)))
    return out


def _classes(stage) -> int:
    space = getattr(type(stage), "label_space", None)
    assert isinstance(space, str), f"{stage.name}: `label_space` must be set on the class (a name from `synfer labels`), got {space!r}"
    return len(label_space(space))


def check_expert(stage, n: int = 5) -> None:
    """predict(list of PIL images) -> (n, classes) probabilities: finite, >= 0, rows summing to 1, deterministic;
    the images it was given unchanged."""
    c = _classes(stage)
    images = sample_images(n)
    before = [im.tobytes() for im in images]
    p = np.asarray(stage.predict(images))
    assert [im.tobytes() for im in images] == before, \
        f"{stage.name}: predict changed the images it was given; copy one (image.copy()) before editing it"
    assert p.shape == (n, c), f"{stage.name}: predict gave shape {p.shape}; expected ({n}, {c}) for label space {stage.label_space}"
    assert np.isfinite(p).all(), f"{stage.name}: predict gave non-finite values"
    assert (p >= 0).all() and np.allclose(p.sum(1), 1, atol=1e-4), \
        f"{stage.name}: predict must give probabilities (>= 0, rows sum to 1), not logits; row sums {p.sum(1)}"
    assert np.allclose(p, np.asarray(stage.predict(images))), f"{stage.name}: predict is not deterministic"


def check_guidance_classifier(stage, n: int = 3, size: int = 32) -> None:
    """forward((n, 3, size, size) in [-1, 1]) -> float logits (n, classes) with a gradient back to the images;
    predict() then works as an expert."""
    import torch  # heavy

    c = _classes(stage)
    x = (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    logits = stage.forward(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (n, c) and logits.is_floating_point(), \
        f"{stage.name}: forward gave {type(logits).__name__} {tuple(getattr(logits, 'shape', ()))}; expected float logits ({n}, {c})"
    assert logits.requires_grad, f"{stage.name}: forward's output has no gradient; semantic guidance needs d(logits)/d(images)"
    (g,) = torch.autograd.grad(logits.logsumexp(1).sum() - logits[:, 0].sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0, f"{stage.name}: the gradient of the logits w.r.t. the images is zero or non-finite"
    check_expert(stage)


def check_evaluator(stage, dataset: str | Path) -> None:
    """evaluate(dataset) -> a non-empty dict of str -> finite float."""
    out = stage.evaluate(Path(dataset))
    assert isinstance(out, dict) and out, f"{stage.name}: evaluate gave {out!r}; expected a dict of metric name -> number"
    for k, v in out.items():
        assert isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v), f"{stage.name}: metric {k!r} = {v!r} is not a finite number"


def check_stage(stage, **kwargs) -> None:
    """Run the contract checks of `stage`'s kind (expert, guidance_classifier, evaluator)."""
    checks = {"expert": check_expert, "guidance_classifier": check_guidance_classifier, "evaluator": check_evaluator}
    if stage.kind not in checks:
        raise NotImplementedError(f"no harness checks for {stage.kind} stages yet; test its methods directly")
    checks[stage.kind](stage, **kwargs)
