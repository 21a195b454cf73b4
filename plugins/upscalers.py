"""Resolution alignment of FEText sources (paper 4.2.1): every face to one square size.

`lanczos` (the default) centre-crops to a square and resamples with a Lanczos filter.
`sd-upscaler` runs diffusers' `StableDiffusionUpscalePipeline` (the x4 super-resolution
model the paper's [48] points to) from a local diffusers folder, on faces smaller than the
target; larger ones only need the Lanczos downscale.
"""
from __future__ import annotations

import zlib
from pathlib import Path

from pydantic import Field

from synfer import hookimpl
from synfer.stages import StageConfig, Upscaler, missing_path


def center_square(image):
    """The largest centred square of a PIL image."""
    w, h = image.size
    if w == h:
        return image
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def lanczos(image, size: int):
    from PIL import Image

    image = center_square(image.convert("RGB"))
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.LANCZOS)


class LanczosUpscaler(Upscaler):
    """Centre-crop to a square, then Lanczos resample to `size` (up or down)."""

    name = "lanczos"
    licence = "MIT (synfer's own; no weights)"

    class Config(StageConfig):
        pass

    def upscale(self, images, size):
        return [lanczos(im, size) for im in images]


class SDUpscalerConfig(StageConfig):
    model: str  # local diffusers folder of a StableDiffusionUpscalePipeline (e.g. stable-diffusion-x4-upscaler)
    steps: int = Field(20, gt=0)  # denoising steps
    prompt: str = "a high-resolution photo of a human face, detailed skin and eyes"
    negative_prompt: str | None = None
    guidance_scale: float = Field(0.0, ge=0)  # > 1 turns classifier-free guidance on (doubles the cost)
    noise_level: int = Field(20, ge=0)  # noise added to the low-resolution input (the pipeline's default)
    only_smaller: bool = True  # faces already >= size are just Lanczos-downscaled
    device: str = "cpu"
    dtype: str = "float32"  # float16 / bfloat16 on a GPU
    seed: int = 0


class SDUpscaler(Upscaler):
    """diffusers StableDiffusionUpscalePipeline from a local folder; output Lanczos-fitted to `size`."""

    name = "sd-upscaler"
    licence = "MIT (code; the upscaler folder the recipe names has its own licence)"
    Config = SDUpscalerConfig

    @classmethod
    def problems(cls, config):
        return missing_path(config, "model", "a local diffusers folder of a StableDiffusionUpscalePipeline (model_index.json)",
                            "Nothing is downloaded: copy stable-diffusion-x4-upscaler there, or use `upscaler: {plugin: lanczos}`.")

    def __init__(self, config=None):
        super().__init__(config)
        self._pipe = None

    @property
    def pipe(self):
        if self._pipe is None:  # load on first use: validating a recipe never touches the weights
            import torch
            from diffusers import StableDiffusionUpscalePipeline

            path = Path(self.config.model).expanduser()
            if not (path / "model_index.json").exists():
                raise FileNotFoundError(f"sd-upscaler: {str(path)!r} is not a diffusers pipeline folder (no model_index.json); "
                                        "download stabilityai/stable-diffusion-x4-upscaler on a connected machine, copy it here "
                                        "and set `model:` to it, or use `upscaler: {plugin: lanczos}`")
            pipe = StableDiffusionUpscalePipeline.from_pretrained(path, dtype=getattr(torch, self.config.dtype), local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe.to(self.config.device)
        return self._pipe

    def _generator(self, image):
        """Noise seeded from (config seed, pixels): a face upscales the same in any batch."""
        import torch

        seed = zlib.crc32(image.tobytes(), self.config.seed) & 0x7FFFFFFF
        return torch.Generator(device="cpu").manual_seed(seed)

    def upscale(self, images, size):
        out = [None] * len(images)
        todo = []
        for i, im in enumerate(images):
            square = center_square(im.convert("RGB"))
            if self.config.only_smaller and square.width >= size:
                out[i] = lanczos(square, size)
            else:
                todo.append((i, square))
        if todo:
            factor = self.pipe.vae_scale_factor  # the x4 upscaler's output is vae_scale_factor x its input
            low = [lanczos(sq, max(size // factor, 8)) for _, sq in todo]
            result = self.pipe(
                prompt=[self.config.prompt] * len(low),
                negative_prompt=[self.config.negative_prompt] * len(low) if self.config.negative_prompt else None,
                image=low,
                num_inference_steps=self.config.steps,
                guidance_scale=self.config.guidance_scale,
                noise_level=self.config.noise_level,
                generator=[self._generator(im) for im in low],
            ).images
            for (i, _), im in zip(todo, result):
                out[i] = lanczos(im, size)
        return out


@hookimpl
def register_stages(register):
    register(LanczosUpscaler)
    register(SDUpscaler)
