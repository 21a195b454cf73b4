"""One or two lines for an exception that reached the command line: what failed, where, what to do.

`synfer` prints these instead of a traceback (`synfer -v ...` shows the traceback).
No torch import here.
"""
from __future__ import annotations

import errno
import os
import traceback

from synfer.engine.lock import LockError
from synfer.engine.logs import plugin_packages
from synfer.engine.registry import loaded_registry

OS_HINTS = {
    errno.ENOSPC: "free space there and rerun the same command: it resumes where it stopped",
    errno.EDQUOT: "free space (or raise the quota) there and rerun the same command: it resumes where it stopped",
    errno.EROFS: "that file system is read-only: choose another output folder (e.g. output=out/x)",
    errno.EACCES: "no permission: choose a folder you can write (e.g. output=out/x) or fix its permissions",
    errno.EPERM: "no permission: choose a folder you can write (e.g. output=out/x) or fix its permissions",
    errno.ENOENT: "check the path (a recipe field or a command option names it)",
    errno.EISDIR: "a folder stands where a file was expected: check the path",
    errno.EEXIST: "a file stands where a folder should be made: check the path (e.g. output= names a file)",
    errno.ENOTDIR: "a file stands where a folder was expected: check the path (e.g. output= names a file)",
}

# synfer's own errors that name the culprit and the fix, wherever they are raised (also inside a plugin)
TEACHING = ("DatasetError", "RecipeError", "PluginError", "CheckpointMismatch", "SourceSchemaError", "EvaluationError")

RERUN = "(rerun with `synfer -v ...` for the traceback)"


def _plugin_frame(exc: BaseException) -> str | None:
    """'module (file:line)' of the innermost traceback frame inside a plugin package (not synfer's core)."""
    found = None
    for frame, line in traceback.walk_tb(exc.__traceback__):
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] in plugin_packages() or _is_registered_plugin_module(module):
            found = f"{module} ({os.path.basename(frame.f_code.co_filename)}:{line})"
    return found


def _is_registered_plugin_module(module: str) -> bool:
    registry = loaded_registry()
    classes = registry.plugins if registry is not None else {}
    return any(getattr(getattr(p, "cls", None), "__module__", None) == module for p in classes.values())


def explain(exc: BaseException) -> str:
    """The message the CLI prints for `exc` (click prefixes 'Error: ')."""
    if isinstance(exc, OSError) and not type(exc).__module__.startswith(("urllib", "http", "requests")):
        path = exc.filename or ""
        what = exc.strerror or str(exc)
        where = f" {path}" if path else ""
        hint = OS_HINTS.get(exc.errno, "check the path and rerun")
        return f"{what}:{where}\n{hint}; what is already written stays intact {RERUN}"
    if isinstance(exc, LockError):
        return str(exc)
    name = type(exc).__name__
    msg = str(exc) or name
    if any(c.__name__ in TEACHING for c in type(exc).__mro__):  # already says what and what to do
        return f"{msg} {RERUN}"
    plugin = _plugin_frame(exc)
    if plugin:
        return f"plugin {plugin} failed: {name}: {msg}\nfix its configuration in the recipe or report it to the plugin's authors {RERUN}"
    if type(exc).__module__.startswith("synfer"):
        return f"{msg} {RERUN}"
    return f"{name}: {msg} {RERUN}"
