"""The guidance classifier's side of the plugin contract (synfer.contract.contracts holds the rest).

`GuardedClassifier` wraps the classifier the generator sees: forward() must give finite floating
(N, classes) logits that carry the gradient, on the images' device (`check_logits`), and on the
first guided step the gradient w.r.t. the images must be finite and not zero (`check_gradient`):
a run never records guidance that did not happen. `guidance_targets` maps each request's class
into the classifier's label space. No torch at import time.
"""
from __future__ import annotations

from synfer.contract import labels as L
from synfer.contract.contracts import ROW_SUM_TOL, Guarded, PluginContractError, _same_space, calling, describe, label_space_of


def check_logits(stage, images, logits, space: str, real: str = ""):
    """Check a guidance classifier's forward(): finite floating (N, classes) logits that carry the gradient, on the
    images' device (moved there when not). `real` says which of the N images are the run's (the generator pads chunks)."""
    import torch  # heavy

    _same_space(stage, space)
    n, c, who = int(images.shape[0]), len(L.label_space(space)), describe(stage)
    batch = f"{n} image(s){real}"
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = f"a {logits.dtype} tensor" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise PluginContractError(f"{who} returned {got} from forward(); expected a floating torch tensor of logits ({n}, {c})")
    if logits.device.type == "meta":
        raise PluginContractError(f"{who} returned logits on the meta device, which hold no values (weights never loaded, or the "
                                  f"model built under init_empty_weights?); expected logits computed on {images.device}")
    if tuple(logits.shape) != (n, c):
        raise PluginContractError(f"{who} returned logits of shape {tuple(logits.shape)} for {batch}; expected ({n}, {c}), "
                                  f"a column per class of {space}")
    if torch.is_grad_enabled() and images.requires_grad and not logits.requires_grad:
        raise PluginContractError(f"{who} returned logits that carry no gradient (detached, or computed under no_grad or "
                                  "through numpy); semantic guidance differentiates them with respect to the image")
    logits = logits.to(images.device)  # differentiable; a no-op where they already agree
    d = logits.detach()
    bad = ~torch.isfinite(d).all(1) & torch.isfinite(images.detach()).flatten(1).all(1)  # NaN in, NaN out is not its fault
    if bool(bad.any()):
        raise PluginContractError(f"{who} returned non-finite logits (NaN or inf) for {int(bad.sum())} of {batch} whose pixels are "
                                  "finite; expected finite logits: guidance would turn the samples to NaN")
    if bool(torch.isfinite(d).all()) and bool((d >= 0).all()) and bool(((d.sum(1) - 1).abs() <= ROW_SUM_TOL).all()):
        raise PluginContractError(f"{who} returned probabilities from forward() (each row is non-negative and sums to 1); "
                                  "expected logits, the scores before the softmax: guidance with probabilities is silently weaker")
    return logits


def check_gradient(stage, x, logits, real: str = "") -> bool:
    """Whether the logits have a finite, non-zero gradient with respect to the classifier's input `x` (one extra
    backward through the classifier alone). A probe along a fixed direction of the classes, not the guidance loss,
    so a confident classifier whose softmax saturates is not taken for a broken one."""
    import torch  # heavy

    who, n, c = describe(stage), int(x.shape[0]), int(logits.shape[1])
    sign = torch.tensor([(-1.0) ** j * (j + 1) for j in range(c)], dtype=logits.dtype, device=logits.device)
    (g,) = torch.autograd.grad(logits, x, grad_outputs=sign.expand_as(logits), retain_graph=True, allow_unused=True)
    if g is None:
        raise PluginContractError(f"{who} returned logits that do not depend on the images it was given (forward() ignores its "
                                  "input?); semantic guidance differentiates them with respect to the image")
    g = g.detach().flatten(1)
    bad = ~torch.isfinite(g).all(1) & torch.isfinite(x.detach()).flatten(1).all(1)
    if bool(bad.any()):
        raise PluginContractError(f"{who} has a non-finite gradient (NaN or inf) with respect to its input for {int(bad.sum())} of "
                                  f"{n} image(s){real} on the first guided step (sqrt or log of 0, a division by a zero norm?); "
                                  "expected a finite gradient: guidance would turn the samples to NaN")
    varied = x.detach().flatten(1).std(1) > 0  # a blank image may have no slope (ReLUs at 0): judge the others
    if not bool(varied.any()):
        return False  # nothing to judge by: the next call checks
    if not bool((g[varied] != 0).any()):
        raise PluginContractError(f"{who} has a zero gradient with respect to its input for all {n} image(s){real} on the first "
                                  "guided step (rounding, argmax, a threshold or a .detach() inside forward()?); semantic guidance "
                                  "would change nothing while every row recorded it. Make forward() differentiable, or remove "
                                  "guidance_classifier from the recipe")
    return True


class GuardedClassifier(Guarded):
    """A guidance classifier as the generator sees it: forward() gets its own copy of the images and is checked
    (check_logits); the first call with a gradient also checks the gradient (check_gradient)."""

    told_real_samples = True  # Guarded's generate() tells it which samples of a padded chunk are the run's

    def __init__(self, stage):
        super().__init__(stage, "forward")
        object.__setattr__(self, "_space", label_space_of(stage))
        object.__setattr__(self, "_real", None)  # the requests of the generate() call being served
        object.__setattr__(self, "_probed", False)

    def forward(self, images):
        import torch  # heavy

        x = images.clone()  # in-place ops inside forward() stay in the classifier's copy; the gradient passes unchanged
        with calling(self._stage, "forward"):
            out = self._stage.forward(x)
        real = self._real_note(int(images.shape[0]))
        out = check_logits(self._stage, x, out, self._space, real)
        if not self._probed and torch.is_grad_enabled() and x.requires_grad:
            with calling(self._stage, "forward"):
                object.__setattr__(self, "_probed", check_gradient(self._stage, x, out, real))
        return out

    def _real_note(self, n: int) -> str:
        """' (a chunk padded to 4 slots; the run's samples: 0, 1)' when the generator padded this batch."""
        real = self._real
        if not real or len(real) >= n:
            return ""
        shown = ", ".join(str(r.index) for r in real[:8]) + (", ..." if len(real) > 8 else "")
        return f" (a chunk the generator padded to {n} slots; the run's samples in it: {shown})"

    @property
    def label_space(self) -> str:
        return self._space


def guidance_targets(classifier, requests) -> tuple[list[int], list[bool]]:
    """Eq. 5's target class per request in the classifier's label space, and whether it can see that class.
    A request whose class it cannot see is marked `guided = False` (written to the sample's metadata)."""
    space = L.label_space(classifier.label_space)
    targets, mask = [], []
    for r in requests:
        c = L.canonical(r.expression)
        targets.append(space.index(c) if c in space else 0)
        mask.append(c in space)
        r.guided = c in space
    return targets, mask
