"""The ranks of a torchrun launch, telling each other how they ended (synfer run's scale-out).

Ranks send each other small point-to-point gloo messages: their counts when their chunks are
done, then a last word; a rank that raises or dies stops the others at their next batch with its
error, and no rank waits at a barrier for a dead one. `distributed()` gives None for one process.
"""
from __future__ import annotations

import datetime
import json
import os
import queue
import re
import threading

from synfer.engine.errors import RERUN, explain


class RankFailed(RuntimeError):
    """Another rank of the torchrun launch raised, or its process ended without a word (killed)."""

    def __init__(self, rank: int, error: str):
        super().__init__(f"rank {rank} failed: {error}")
        self.rank, self.error = rank, error


class Peers:
    """The other ranks of a torchrun launch, listened to while this one works.

    Ranks send each other small point-to-point gloo messages: their counts when their chunks are
    done, then a last word (rank 0's: the merged run is whole; the others': goodbye, once they heard
    it; a failing rank's: its error). A thread per peer listens, so a rank that raises, or is killed
    (its sockets close), stops the others at their next batch with its error. No barrier waits for
    a dead rank: torchrun keeps a finished agent 300 s at its exit barrier when another agent's
    worker failed. The group is destroyed once every listener heard its peer's last word or death:
    a receive still pending at exit, or a group left to the interpreter's teardown, aborts the
    process (`terminate called without an active exception`, pytorch#65231).
    """

    SIZE = 4096  # bytes per message: JSON, an error cut to fit
    FAIL_WAIT = 120.0  # seconds a failing rank waits for the others' last words (each within its current batch)

    def __init__(self, dist, rank: int, world: int, owns_default: bool):
        self.dist, self.rank, self.owns_default = dist, rank, owns_default
        self.others = [r for r in range(world) if r != rank]
        # a message waits as long as the slowest rank needs (a week at most); a dead peer fails it at once
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
        self.heard: queue.Queue = queue.Queue()
        self.counts: dict[int, list[int]] = {}
        self.last: set[int] = set()  # peers whose last word arrived
        self.said_last = False
        self.listeners = [threading.Thread(target=self._listen, args=(r,), name=f"synfer-rank-{r}", daemon=True) for r in self.others]
        for t in self.listeners:
            t.start()

    def _listen(self, src: int) -> None:
        import torch  # heavy

        while True:
            buf = torch.zeros(self.SIZE, dtype=torch.uint8)
            try:
                self.dist.recv(buf, src=src, group=self.group)
                msg = json.loads(bytes(buf.numpy()).rstrip(b"\0"))
            except Exception as exc:  # noqa: BLE001 - gloo: "Connection closed by peer" when its process is gone
                first = re.sub(r"^\[[^\]]*\] ", "", str(exc).strip()).split(". ")[0]  # gloo's source location off
                msg = {"error": f"its process ended without reporting an error (killed, or crashed); see its log ({first})",
                       "rank": src, "last": True}
            self.heard.put((src, msg))
            if msg.get("last"):
                return

    def _send(self, msg: dict) -> None:
        import torch  # heavy

        data = json.dumps(msg, ensure_ascii=False).encode()
        if len(data) > self.SIZE:  # cut the error: each character cut is at least one byte less
            err = msg["error"]
            data = json.dumps({**msg, "error": err[: max(0, len(err) - (len(data) - self.SIZE) - 3)] + "..."}, ensure_ascii=False).encode()
        buf = torch.zeros(self.SIZE, dtype=torch.uint8)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        works = []
        for r in self.others:
            try:
                works.append(self.dist.isend(buf, dst=r, group=self.group))
            except Exception:  # noqa: BLE001 - that peer is gone; its own agent reports it
                pass
        for w in works:
            try:
                w.wait()
            except Exception:  # noqa: BLE001
                pass
        self.said_last = self.said_last or bool(msg.get("last"))

    def _take(self, block: bool) -> bool:
        """Handle one message heard (waiting for it when `block`); a peer's error is raised here."""
        try:
            src, msg = self.heard.get(block=block)
        except queue.Empty:
            return False
        if "counts" in msg:
            self.counts[src] = msg["counts"]
        if msg.get("last"):
            self.last.add(src)
        if "error" in msg:
            raise RankFailed(msg.get("rank", src), msg["error"])
        return True

    def check(self) -> None:
        """Between batches: raise the error of a peer that failed meanwhile."""
        while self._take(block=False):
            pass

    def gather(self, counts: list[int]) -> list[int]:
        """Every rank's counts, summed: sent to all, then waited for from all (the end of generation)."""
        self._send({"counts": counts})
        while len(self.counts) < len(self.others):
            self._take(block=True)
        return [sum(c) for c in zip(counts, *self.counts.values())]

    def finish(self) -> None:
        """Rank 0, the run summarised: its last word. The others say goodbye once they heard it. Every rank
        returns once every other has spoken its last word, so none leaves the others to torchrun's exit barrier."""
        if self.rank == 0:
            self._send({"last": True})
        while 0 not in self.last and self.rank != 0:
            self._take(block=True)
        if self.rank != 0:
            self._send({"last": True})
        while len(self.last) < len(self.others):
            self._take(block=True)
        self.close()

    def fail(self, exc: BaseException) -> None:
        """This rank failed: tell the others (its error, or the peer's it relays), then wait a while for their last words."""
        if not self.said_last:
            if isinstance(exc, RankFailed):
                msg = {"error": exc.error, "rank": exc.rank}
            else:
                msg = {"error": explain(exc).replace(f" {RERUN}", ""), "rank": self.rank}
            self._send({**msg, "last": True})
        for t in self.listeners:
            t.join(timeout=self.FAIL_WAIT / len(self.listeners))
        if not any(t.is_alive() for t in self.listeners):  # else a receive is pending: leave the group to the exit
            self.close()

    def close(self) -> None:
        for t in self.listeners:
            t.join()
        self.dist.destroy_process_group(None if self.owns_default else self.group)


def distributed(world: int, rank: int) -> Peers | None:
    """The other ranks of a torchrun launch (point-to-point gloo messages, also beside GPUs); None for one process."""
    if world <= 1:
        return None

    import torch  # heavy
    import torch.distributed as dist  # heavy

    owns = not dist.is_initialized()
    if owns:
        if torch.cuda.is_available():  # each rank on its own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # ranks start together (torchrun's rendezvous came first): one that never arrives fails this in 10 minutes
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    return Peers(dist, rank, world, owns)
