"""synfer: synthesize facial-expression datasets with diffusion models and label them reliably.

The Python API (docs/api.md) lives in synfer.api and loads on first use, so `import synfer` (and
`synfer --help`, `plugins`, `validate`) stays light: no plugin, no torch.
"""
import sys
import types

from synfer.hookspecs import hookimpl

__version__ = "0.1.0"
API = ("Dataset", "label", "load_recipe", "open_dataset", "plan", "run", "stage", "validate")
__all__ = ["hookimpl", "__version__", *API]


def __getattr__(name: str):
    if name in API:
        from synfer import api

        return getattr(api, name)
    raise AttributeError(f"module 'synfer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(API))


class _Package(types.ModuleType):
    """`synfer.label` is the API function, also once the submodule synfer/label.py (`synfer label`) is imported:
    Python's import sets the package attribute to the submodule, which would shadow the function. The submodule
    stays in sys.modules, where `from synfer.label import ...` and importlib find it."""

    def __setattr__(self, name, value):
        if name in API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
