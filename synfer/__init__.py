"""synfer: synthesize facial-expression datasets with diffusion models and label them reliably."""
from synfer.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
