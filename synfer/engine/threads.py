"""How many CPU threads torch uses: decided once, when `synfer run`, `train` or `fetext build` starts.

Batch-1 CPU kernels on a busy machine spin in thread barriers: two threads on 2 cores
with a load of 9 ran ~65x slower than quiet (issue 17; bench/README.md, Threads). So `auto`
(the default) takes only the cores that are actually free:

- OMP_NUM_THREADS set by the user wins (torchrun sets it to 1 for its workers);
- else the cores this process may run on (`os.sched_getaffinity`) minus the load: the other tasks
  runnable right now (/proc/loadavg's running count, averaged over ~0.2 s), or, where that file is
  missing, the 1-minute load average. The average lags by a minute: right after another job ended
  it still counted that job and chose 1 thread on an idle 2-core machine (bench/README.md, Threads);
  rounded, at least 1;
- shared by the torchrun workers of this machine (LOCAL_WORLD_SIZE, else WORLD_SIZE): 1 each on 2 cores.

An integer (recipe `threads: 2`, `synfer train --threads 2`, SYNFER_THREADS=2) is used as given.
torch's intra-op threads (and inter-op threads, when torch has not started that pool yet) and the
OMP/MKL variables that child processes read are set to the result. The thread count does not
change the samples at the `sd` generator's default chunk (measured, docs/results.md, Speed).
No torch import at module level: `synfer --help` stays fast.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

ENV = "SYNFER_THREADS"  # the CLI's --threads for train and fetext; a recipe's `threads` for run
_ours: dict[str, str] = {}  # OMP/MKL variables configure() itself wrote (not the user's to respect)


def parse(setting) -> int | str:
    """'auto' or a positive int (also from a string); anything else is a ValueError that says what is expected."""
    if setting is None or (isinstance(setting, str) and setting.strip().lower() in ("", "auto")):
        return "auto"
    try:
        n = int(setting) if not isinstance(setting, (bool, float)) else 0
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"threads={setting!r}: expected 'auto' or a positive integer (CPU threads torch may use)")
    return n


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _runnable_others(samples: int = 10, interval: float = 0.02) -> float | None:
    """Tasks other than this one runnable now (mean over `samples` reads of /proc/loadavg), or None off Linux."""
    counts = []
    for i in range(samples):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        except (OSError, IndexError):
            return None
        counts.append(max(0, int(running) - 1))  # minus ourselves, running while we read
        if i + 1 < samples:
            time.sleep(interval)
    return sum(counts) / len(counts)


def _load() -> float:
    now = _runnable_others()
    if now is not None:
        return now
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def decide(setting="auto", env: Mapping[str, str] | None = None, cores: int | None = None,
           load: float | None = None) -> tuple[int, str]:
    """(threads, why) for a setting ('auto' or an int), without touching torch."""
    env = os.environ if env is None else env
    setting = parse(setting)
    if setting != "auto":
        return setting, f"threads={setting} was set"
    omp = env.get("OMP_NUM_THREADS", "")
    if omp and _ours.get("OMP_NUM_THREADS") != omp:
        try:
            if int(omp) >= 1:
                return int(omp), f"auto: OMP_NUM_THREADS={omp} is set"
        except ValueError:
            pass
    cores = _cores() if cores is None else cores
    load = _load() if load is None else load
    free = max(1, min(cores, int(cores - load + 0.5)))
    workers = int(env.get("LOCAL_WORLD_SIZE") or env.get("WORLD_SIZE") or 1)
    n = max(1, free // max(1, workers))
    why = f"auto: {cores} core(s) for this process, load {load:.2f}, so {free} free"
    return n, why + (f", shared by {workers} torchrun workers" if workers > 1 else "")


def configure(setting="auto") -> int:
    """Decide (see `decide`) and apply the thread count once for this process; logs it at info level."""
    n, why = decide(setting)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # child processes (data loaders, subprocesses) follow
        if key not in os.environ or os.environ[key] == _ours.get(key):  # a value the user set stays
            os.environ[key] = _ours[key] = str(n)
    import torch  # heavy

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # the inter-op pool has started already (only possible before any parallel work)
        pass
    log.info("threads: %d (%s)", n, why)
    return n
