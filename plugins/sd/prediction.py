"""One conversion of a UNet output into (x0, noise) that honours the scheduler's `prediction_type`.

Eq. 1 noises x0 to x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps. What the UNet predicts from x_t depends on
how the model was trained, and the scheduler config says which:
- `epsilon` (SD 1.x, SD 2.x base, SDXL): eps;
- `v_prediction` (SD 2.x 768-v): v = sqrt(a_t) eps - sqrt(1 - a_t) x0;
- `sample`: x0 itself.
Every formula of the method that needs x0 or the noise goes through `split_prediction`: semantic
guidance's x0 estimate (Eq. 4), DDIM inversion off the DDIM grid, the approx decoder's distillation
targets. The training loss target is `training_target`. diffusers' own schedulers (DDIM, DPM-Solver++,
UniPC, DDIMInverseScheduler) read `prediction_type` themselves in `step`.
"""
from __future__ import annotations

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler) -> str:
    """The scheduler config's `prediction_type`, checked against the three this module converts."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {kind!r}: synfer converts {', '.join(PREDICTION_TYPES)}. "
                         "Fix scheduler/scheduler_config.json of the model folder (SD 2.x 768-v models say v_prediction).")
    return kind


def split_prediction(output, x_t, alpha_prod, kind: str = "epsilon"):
    """(x0, eps) of `x_t` at noise level `alpha_prod` (a_t = alphas_cumprod[t], a tensor broadcastable to x_t),
    from the UNet's `output` of type `kind`. Differentiable; the epsilon branch is Eq. 4 exactly."""
    a = alpha_prod
    if kind == "epsilon":
        eps = output
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt(), eps  # Eq. 4
    if kind == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0 and x_t = sqrt(a) x0 + sqrt(1 - a) eps, solved for x0, eps
        return a.sqrt() * x_t - (1 - a).sqrt() * output, a.sqrt() * output + (1 - a).sqrt() * x_t
    if kind == "sample":
        return output, (x_t - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"prediction_type {kind!r}: expected one of {', '.join(PREDICTION_TYPES)}")


def model_x0(scheduler, output, x_t, t):
    """x0 predicted from the UNet `output` at x_t and integer timestep(s) t (scalar, or one per sample)."""
    return split_prediction(output, x_t, _alpha(scheduler, t, x_t), prediction_type(scheduler))[0]


def training_target(scheduler, x0, noise, t):
    """What the UNet learns to output (Eq. 3's regression target) for x0 noised with `noise` to t."""
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


def _alpha(scheduler, t, like):
    """alphas_cumprod at t, shaped to broadcast against `like` (B, C, H, W), in its dtype and device."""
    import torch

    a = scheduler.alphas_cumprod.to(like.device)[torch.as_tensor(t, device=like.device).long()]
    return a.view(-1, *([1] * (like.ndim - 1))).to(like.dtype) if a.ndim else a.to(like.dtype)
