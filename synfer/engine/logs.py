"""Quiet by default, verbose on request: what `synfer` prints besides its own progress and summary.

The CLI calls `setup(verbosity)` once, before any command runs (-q: -1, default 0, -v: 1, -vv: 2):

- default: warnings and errors from synfer and its plugins, each printed once; the libraries it
  drives (torch, diffusers, transformers, mmengine, ...) only when something fails. Their INFO
  logs, their advice to their own users (diffusers' "Cannot initialize model with low cpu memory
  usage because `accelerate` was not found"), their "Loading weights" progress bars and their
  deprecation warnings stay hidden. `synfer train` shows one progress bar with the loss instead of
  mmengine's per-iteration lines; the full mmengine log is still written to the work folder.
- -v: INFO from synfer and every library, library progress bars and warnings, mmengine's log lines.
- -vv: DEBUG as well.
- -q: errors only.

No torch, diffusers or transformers import here: `synfer --help` stays fast. The libraries read
the environment variables set here when they are first imported (a variable the user set wins),
and their loggers are also set directly in case they are already loaded.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from importlib import metadata

# Libraries whose logs and warnings are hidden unless -v. Paths of their files decide where a
# warning comes from (`warnings.warn(..., stacklevel=2)` inside them may point one frame out).
LIBRARIES = ("torch", "torchvision", "diffusers", "transformers", "huggingface_hub", "tokenizers", "safetensors",
             "accelerate", "mmengine", "mmcv", "matplotlib", "PIL", "h5py", "scipy", "numpy", "datasets",
             "pyarrow", "fsspec", "filelock", "urllib3", "cv2", "skimage", "peft")
# Libraries whose WARNING lines are advice for their own users (install X, use Y) rather than
# a fault in the run: shown only with -v.
ADVISORY = ("diffusers", "transformers", "huggingface_hub", "accelerate")
LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}

VERBOSITY_ENV = "SYNFER_VERBOSITY"  # set by `setup`, so torchrun ranks and subprocesses inherit -q/-v
_seen: set[tuple[str, str]] = set()
_set_by_us: dict[str, str] = {}  # environment variables setup() wrote, with their values


def verbosity() -> int:
    """-1 quiet, 0 default, 1 verbose, 2 debug: what `setup` was given (0 if it was not called)."""
    try:
        return max(-1, min(2, int(os.environ.get(VERBOSITY_ENV, "0"))))
    except ValueError:
        return 0


def setup(verbosity: int = 0) -> None:
    """Configure logging and warnings for one `synfer` process (see the module docstring)."""
    verbosity = max(-1, min(2, int(verbosity)))
    os.environ[VERBOSITY_ENV] = str(verbosity)
    level = LEVELS[verbosity]
    lib_level = level if verbosity != 0 else logging.WARNING
    advisory_level = logging.ERROR if verbosity <= 0 else level

    env = {"DIFFUSERS_VERBOSITY": logging.getLevelName(advisory_level).lower(),
           "TRANSFORMERS_VERBOSITY": logging.getLevelName(advisory_level).lower()}
    if verbosity <= 0:
        env.update(HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    for key, value in env.items():  # a value the user set wins; one an earlier setup() set is ours to change
        if key not in os.environ or os.environ[key] == _set_by_us.get(key):
            os.environ[key] = _set_by_us[key] = value

    root = logging.getLogger()
    if not any(getattr(h, "_synfer", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        handler._synfer = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(lib_level)
    for name in ("synfer", *plugin_packages()):
        logging.getLogger(name).setLevel(level)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(advisory_level if name in ADVISORY else lib_level)
    _configure_loaded_libraries(verbosity)

    _seen.clear()
    warnings.showwarning = _showwarning
    if verbosity >= 1:
        warnings.simplefilter("default")  # every warning once per place, deprecations included
    elif verbosity < 0:
        warnings.simplefilter("ignore")


def _configure_loaded_libraries(verbosity: int) -> None:
    """Libraries imported before `setup` read no environment variable again: set them directly."""
    quiet = verbosity <= 0
    for name in ("diffusers", "transformers"):
        if name in sys.modules:
            lib_logging = getattr(getattr(sys.modules[name], "utils", None), "logging", None)
            if lib_logging is None:
                continue
            lib_logging.set_verbosity(logging.ERROR if quiet else LEVELS[verbosity])
            (lib_logging.disable_progress_bar if quiet else lib_logging.enable_progress_bar)()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (click's test runner and pytest swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


@functools.lru_cache(maxsize=1)
def plugin_packages() -> frozenset[str]:
    """Top-level packages of every installed synfer plugin (from entry points; nothing is imported).
    Their loggers and warnings count as synfer's own, built-in or not."""
    return frozenset(ep.value.split(":")[0].split(".")[0] for ep in metadata.entry_points(group="synfer"))


class _Formatter(logging.Formatter):
    """`warning: message` for synfer's own records; `warning (diffusers): message` for a library's."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        top = record.name.split(".")[0]
        where = "" if top in ("synfer", "root", "py") or top in plugin_packages() else f" ({top})"
        return f"{record.levelname.lower()}{where}: {msg}"


def _library_of(filename: str) -> str | None:
    """The LIBRARIES entry a source file belongs to, else None (synfer, a plugin, user code)."""
    parts = filename.replace("\\", "/").split("/")
    for i, part in enumerate(parts[:-1]):
        if part in ("site-packages", "dist-packages") and parts[i + 1].split(".")[0] in LIBRARIES:
            return parts[i + 1].split(".")[0]
    return None


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    """Each warning once (by category and text), library warnings only with -v."""
    key = (category.__name__, str(message))
    if key in _seen:
        return
    _seen.add(key)
    library = _library_of(str(filename))
    if library and verbosity() < 1:
        return
    tags = ", ".join(t for t in (library, category.__name__ if category is not UserWarning else None) if t)
    text = f"warning{f' ({tags})' if tags else ''}: {message}"
    if verbosity() >= 1:
        text += f" [{filename}:{lineno}]"
    print(text, file=file if file is not None else sys.stderr)


# ---------------------------------------------------------------- mmengine (synfer train)


def runner_class():
    """mmengine's Runner, with its console lines below ERROR replaced by one progress bar.

    The log file in the work folder keeps every line (environment, config, a loss line every
    `log_interval` iterations, checkpoints). With -v the console shows them too, without the bar.
    """
    from mmengine.runner import Runner  # heavy

    if "cls" not in _runner_cache:
        class SynferRunner(Runner):
            def build_logger(self, log_level="INFO", log_file=None, **kwargs):
                logger = super().build_logger(log_level=log_level, log_file=log_file, **kwargs)
                if verbosity() < 1:  # mmengine's warnings are about its own config (registries, FileClient): file only
                    for h in logger.handlers:
                        if not isinstance(h, logging.FileHandler):
                            h.setLevel(max(h.level, logging.ERROR))
                return logger

            def register_hooks(self, default_hooks=None, custom_hooks=None):
                super().register_hooks(default_hooks, custom_hooks)
                if verbosity() < 1:
                    self.register_hook(progress_hook(), priority="VERY_LOW")

        _runner_cache["cls"] = SynferRunner
    return _runner_cache["cls"]


_runner_cache: dict[str, type] = {}


def progress_hook():
    """An mmengine hook drawing one tqdm bar for a training run: iterations, it/s, loss."""
    from mmengine.hooks import Hook  # heavy
    from tqdm.auto import tqdm  # heavy

    class ProgressBarHook(Hook):
        priority = "VERY_LOW"

        def __init__(self):
            self.bar = None

        def before_train(self, runner) -> None:
            self.bar = tqdm(total=runner.max_iters, initial=runner.iter, desc="train", unit="it", dynamic_ncols=True,
                            disable=runner.rank != 0 or verbosity() < 0, leave=True)

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            if self.bar is None:
                return
            self.bar.update(1)
            loss = (outputs or {}).get("loss")
            if loss is not None and (runner.iter % 10 == 0 or runner.iter + 1 >= runner.max_iters):
                self.bar.set_postfix(loss=f"{float(loss.detach() if hasattr(loss, 'detach') else loss):.4f}", refresh=False)

        def after_train(self, runner) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return ProgressBarHook()
