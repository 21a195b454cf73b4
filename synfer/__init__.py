"""synfer: synthesize facial-expression datasets with diffusion models and label them reliably.

The core stands on three floors, each importing only the floors below it (docs/design.md):
`synfer.contract` (what a plugin implements), `synfer.engine` (what runs a recipe) and
`synfer.commands` (the `synfer` command line). `synfer.api` (docs/api.md) and `synfer.testing`
stand on top. The API loads on first use, so `import synfer` (and `synfer --help`, `plugins`,
`validate`) stays light: no plugin, no torch.

Modules moved into the floors keep their old names (`synfer.stages`, `synfer.labels`,
`synfer.dataset`, ...) as aliases of the same module objects, so plugins written before the
floors still import.
"""
import importlib
import importlib.abc
import importlib.util
import sys

from synfer.contract.hookspecs import hookimpl

__version__ = "0.1.0"
API = ("Dataset", "label", "load_recipe", "open_dataset", "plan", "run", "stage", "validate")
__all__ = ["hookimpl", "__version__", *API]

# old flat name -> module. `synfer.label` is the API function, so the `synfer label` module has no alias.
MOVED = {
    **{m: f"synfer.contract.{m}" for m in ("stages", "contracts", "guidance_contract", "labels", "hookspecs", "isolation",
                                           "rows")},
    **{m: f"synfer.engine.{m}" for m in ("recipe", "align", "pipeline", "ensemble", "dataset", "rowscan", "resume", "lock",
                                         "seeds", "peers", "evaluate", "card", "threads", "stamps", "arrays", "scoring",
                                         "training", "checkpoints", "optimizers", "logs", "errors", "fetch", "faults")},
    "plugins": "synfer.engine.registry",
    **{m: f"synfer.commands.{m}" for m in ("cli", "report", "benchmark", "selfsup", "fetext", "bootstrap", "scaffold",
                                           "recipedocs", "calibrate")},
}


def __getattr__(name: str):
    if name in API:
        from synfer import api

        return getattr(api, name)
    raise AttributeError(f"module 'synfer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(API))


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import synfer.stages` gives the module `synfer.contract.stages` itself (one module object, so classes and
    registries are shared), and `python -m synfer.cli` still starts the command line."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("synfer.") and fullname[len("synfer."):] in MOVED:
            target = importlib.util.find_spec(MOVED[fullname[len("synfer."):]])
            return importlib.util.spec_from_loader(fullname, self, origin=target.origin if target else None)
        return None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name[len("synfer."):]])

    def exec_module(self, module):
        pass  # the module ran when it was first imported under its own name

    def get_code(self, fullname):
        """What `python -m synfer.cli` runs (runpy asks the loader for code and never imports the module)."""
        if fullname == "synfer.cli":
            return compile("from synfer.commands.cli import main\nmain()\n", "<synfer.cli>", "exec")
        return None


if not any(isinstance(f, _Alias) for f in sys.meta_path):
    sys.meta_path.append(_Alias())
