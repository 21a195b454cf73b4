"""Which backbone runs a diffusers folder, read from its model_index.json without importing torch.

`backbone_for(path)` picks the backbone class (model.SDModel for SD 1.x/2.x, sdxl.SDXLModel for SDXL) by the
pipeline class the folder's model_index.json names; `validate` calls `pipeline_problems` through the
generator's `problems`, so a folder of a pipeline the generator cannot run (SD3, FLUX) is refused before
any weight loads. `load_schedulers` keeps the folder's own sampler class for saving.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

def pipeline_class(path: str | Path) -> str | None:
    """The `_class_name` of the folder's model_index.json (read as JSON: no torch), or None without one."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def backbones() -> list[type]:
    """The backbones of the built-in `sd` generator (importing them imports no torch)."""
    from synfer_plugins.sd.model import SDModel
    from synfer_plugins.sd.sdxl import SDXLModel

    return [SDModel, SDXLModel]


def backbone_for(path: str | Path, choices: Sequence[type] | None = None) -> type:
    """The backbone class that runs the folder: by model_index.json's pipeline class (no index: SD 1.x layout)."""
    choices = list(choices or backbones())
    name = pipeline_class(path)
    for cls in choices:
        if name is None or name in cls.pipeline_classes:
            return cls
    supported = sorted({n for cls in choices for n in cls.pipeline_classes})
    raise ValueError(unsupported_message(path, name, supported))


def unsupported_message(path, name: str, supported: Sequence[str]) -> str:
    return (f"{path}/model_index.json names {name}, which this generator does not run; it runs {', '.join(supported)}. "
            f"A transformer backbone (SD3, FLUX) needs a generator plugin of its own (docs/plugins.md, 'Backbones'). "
            "Point generator.model at a folder of a supported pipeline.")


def load_schedulers(path: Path) -> dict:
    """{"scheduler": the DDIM view of the folder's noise schedule (alphas_cumprod, add_noise; every sampler is built
    from its config), "folder_scheduler": the folder's own scheduler class, kept for saving (None: it is DDIM)}."""
    import diffusers
    from diffusers import DDIMScheduler

    folder = path / "scheduler"
    if not folder.is_dir():
        return {"scheduler": DDIMScheduler(), "folder_scheduler": None}
    name = json.loads((folder / "scheduler_config.json").read_text()).get("_class_name", "DDIMScheduler")
    own_cls = getattr(diffusers, name, None)
    if name == "DDIMScheduler" or own_cls is None or not hasattr(own_cls, "from_pretrained"):
        return {"scheduler": DDIMScheduler.from_pretrained(str(folder)), "folder_scheduler": None}
    own = own_cls.from_pretrained(str(folder))
    return {"scheduler": DDIMScheduler.from_config(own.config), "folder_scheduler": own}


def pipeline_problems(path: str | Path, choices: Sequence[type] | None = None, field: str = "model") -> list[str]:
    """A problem line when the folder's model_index.json names a pipeline none of `choices` runs (validate)."""
    try:
        backbone_for(path, choices)
    except ValueError as exc:
        return [f"{field}: {exc}"]
    return []
