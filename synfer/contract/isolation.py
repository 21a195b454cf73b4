"""What plugin code may not reach: synfer's exit, its Ctrl-C, and its machine-readable stdout.

Plugin code (an import, a hook, a stage's method) runs inside `plugin_code()`:
- `sys.exit()` or a `KeyboardInterrupt` raised by the plugin itself are described by `escaped()` so
  the caller can turn them into a plugin error naming the plugin, as any other exception;
- a real Ctrl-C passes unchanged, so a run still stops at once and resumes on rerun. Real is
  told from raised by a SIGINT handler (`watch_interrupts`) that counts the signals; where another
  handler owns SIGINT (a notebook), every KeyboardInterrupt is taken as real;
- what the plugin prints goes to stderr, so `synfer plugins --json` and other stdout stay parseable.

No torch import here.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

_sigints = 0  # SIGINTs seen by our handler and not yet matched to the KeyboardInterrupt they raised
_watching = False


def _on_sigint(signum, frame):
    global _sigints
    _sigints += 1
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as Python's own handler does


def watch_interrupts() -> None:
    """Count real Ctrl-Cs, when Python's default SIGINT handler is in place (idempotent; main thread only)."""
    global _watching
    if _watching or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    _watching = signal.getsignal(signal.SIGINT) is _on_sigint


def _real_interrupt(exc: KeyboardInterrupt) -> bool:
    """Whether a KeyboardInterrupt came from a Ctrl-C (or we cannot tell): it must then stop synfer."""
    global _sigints
    if getattr(exc, "_synfer_sigint", False):
        return True
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # no Ctrl-C reaches this process (started in the background,
        return False  # as CI may start it): any KeyboardInterrupt was raised by code
    if not _watching:
        return True
    if _sigints > 0:  # mark it, so an outer plugin boundary sees the same interrupt as real too
        _sigints -= 1
        exc._synfer_sigint = True
        return True
    return False


def escaped(exc: BaseException) -> str | None:
    """'ValueError: ...', 'called sys.exit(3)', ... for an exception out of plugin code; None when it
    must propagate unchanged (a real Ctrl-C, GeneratorExit)."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r}); a plugin raises an exception and never exits synfer"
    if isinstance(exc, KeyboardInterrupt):
        return None if _real_interrupt(exc) else "raised KeyboardInterrupt without a Ctrl-C; a plugin raises an ordinary exception"
    if isinstance(exc, Exception):
        return f"{type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def plugin_code():
    """Run plugin code with its prints sent to stderr (stdout is synfer's: JSON, tables, a plugin's own command)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
