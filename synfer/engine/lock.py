"""One writer per output folder: `synfer run` and `synfer fetext build` hold `<output>/.synfer.lock`.

The lock file is created atomically (written whole to a temp file, then hard-linked into
place, so nobody ever reads half a lock) and holds the writer's PID, host, start time and
command. A second writer into the same folder stops with a message naming the holder. A lock
whose process is gone (same host, PID dead or reused by another process) is stale: it is taken
over with a note, so a killed run resumes as before. Under torchrun every rank of one launch
shares the lock (they agree on MASTER_ADDR/MASTER_PORT and the rendezvous id); the first rank
to arrive creates it and rank 0 removes it at the end.

No torch import here.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from synfer.engine.dataset import METADATA, PARTS, DatasetError

LOCK_FILE = ".synfer.lock"


class LockError(RuntimeError):
    """Another live process writes into the same output folder."""


def _run_key() -> str:
    """What all ranks of one torchrun launch share, and no other launch does; '' outside torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return ""
    return "torchrun {}:{} {}".format(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
                                       os.environ.get("TORCHELASTIC_RUN_ID", ""))


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc), to tell a reused PID from the writer; None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


def _describe(info: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
    return f"PID {info.get('pid')} on {info.get('host')} since {when} ({info.get('command', '?')})"


class OutputLock:
    """`with OutputLock(folder, "synfer run"):` ... Raises LockError when another live writer holds it."""

    def __init__(self, folder: str | os.PathLike, command: str, rank: int | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.key = _run_key()
        self.note: str | None = None  # set when a stale lock was taken over
        self.held = False

    def _info(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid), "time": time.time(),
                "command": self.command, "run": self.key}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale below

    def _create(self) -> bool:
        tmp = self.folder / f"{LOCK_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self._info()) + "\n")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> "OutputLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self.held = True
                return self
            info = self._read()
            if info is None:
                continue  # released between our try and our read
            if self.key and info.get("run") == self.key:
                return self  # another rank of this torchrun launch made it: shared
            same_host = info.get("host") == socket.gethostname()
            if info and not (same_host and isinstance(info.get("pid"), int) and not _alive(info["pid"], info.get("started"))):
                where = "" if same_host else " (another host: synfer cannot check whether it still runs)"
                raise LockError(f"{self.folder} is being written by {_describe(info)}{where}. Wait for it to finish or use "
                                f"another output folder; if that process is really gone, delete {self.path}")
            self.note = f"note: took over the stale lock of {_describe(info) if info else 'an unreadable lock file'} in {self.folder}"
            if os.environ.get("SYNFER_VERBOSITY", "0") != "-1":  # `synfer -q`: no notes
                print(self.note, file=sys.stderr)
            try:
                os.replace(self.path, self.path.with_name(LOCK_FILE + f".stale.{os.getpid()}"))
                self.path.with_name(LOCK_FILE + f".stale.{os.getpid()}").unlink()
            except FileNotFoundError:
                pass
        raise LockError(f"could not take the lock {self.path} (it keeps changing hands); is another writer starting right now?")

    def release(self) -> None:
        """The creator (or rank 0 of a torchrun launch, after the barrier) removes the lock, only if it is still ours."""
        info = self._read() or {}
        if self.key:  # torchrun: the lock is the launch's, and rank 0 is the last to finish
            ours = self.rank == 0 and info.get("run") == self.key
        else:
            ours = info.get("pid") == os.getpid()
        if ours:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        if self.held or self.key:
            self.release()


def refuse_other_kind(folder: str | os.PathLike, kind: str) -> None:
    """Stop before writing when `folder` already holds the other kind of synfer dataset.

    kind "fetext": refuse generated samples (rows carry `preassigned_label`); kind "run": refuse
    FEText faces (rows carry `expression`, no `preassigned_label`). Mixing them would break both.
    (`synfer run` itself gets this check from synfer.engine.resume.check_resume, with its recipe check.)"""
    folder = Path(folder)
    candidates = [folder / METADATA, *sorted((folder / PARTS).glob("rank-*.jsonl"))] if folder.is_dir() else []
    for path in candidates:
        try:
            with open(path, "rb") as f:
                first = f.readline()
            row = json.loads(first) if first.endswith(b"\n") else None
        except (OSError, ValueError):
            continue
        if not isinstance(row, dict) or "file_name" not in row:
            continue
        is_run = "preassigned_label" in row
        if kind == "run" and not is_run:
            raise DatasetError(f"{folder} holds a FEText dataset (built by `synfer fetext build`; its rows have no preassigned_label), "
                               "not the output of a run; set output= to another folder (the FEText folder is what `layout.source` or "
                               "`synfer train --data` read)")
        if kind == "fetext" and is_run:
            raise DatasetError(f"{folder} holds generated samples of `synfer run` (its rows have a preassigned_label), not FEText; "
                               "set output= to another folder")
        return
