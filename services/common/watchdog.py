"""Progress of the loops a pod cannot live without, for its liveness check.

A loop that has work but has stopped moving is wedged: a read whose reply never
comes, a GPU kernel that hangs, a deadlock between threads. The process around it
still answers HTTP and Redis, so neither a probe of the event loop nor Redis's view
of the pod notices, and Kubernetes would leave the pod up forever. Each such loop
keeps a :class:`Progress`; the pod's liveness check fails while one has had work
and not moved for longer than its limit, and Kubernetes restarts the pod.

An idle loop is never stalled: waiting for work is not being stuck.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class Progress:
    """When one loop last moved, and whether it has work to move on."""

    def __init__(self, name: str, *, always_busy: bool = False) -> None:
        """``always_busy``: a loop that must always turn (a poll loop), not only while
        it has work."""
        self.name = name
        self._moved_at = time.monotonic()
        self._busy = 1 if always_busy else 0

    def moved(self) -> None:
        """The loop did a unit of work (or handled a failure): it is not stuck."""
        self._moved_at = time.monotonic()

    @contextmanager
    def working(self) -> Iterator[None]:
        """Around a stretch of work; nested and concurrent stretches count once.
        The clock starts when the loop goes from idle to busy."""
        if self._busy == 0:
            self._moved_at = time.monotonic()
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    @property
    def busy(self) -> bool:
        return self._busy > 0

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds this loop has had work without moving; 0 while it is idle."""
        if not self._busy:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - self._moved_at)


@dataclass(frozen=True)
class Stall:
    """A loop that has not moved for longer than its limit."""

    loop: str
    seconds: float

    def __str__(self) -> str:
        return f"{self.loop} has not moved for {self.seconds:.1f}s"


def stalls(progresses: Iterable[Progress], limit: float) -> list[Stall]:
    """The loops among ``progresses`` stalled for longer than ``limit`` seconds
    (none when ``limit`` is 0: the watchdog is off)."""
    if limit <= 0:
        return []
    now = time.monotonic()
    found = []
    for progress in progresses:
        seconds = progress.stalled_for(now)
        if seconds > limit:
            found.append(Stall(progress.name, round(seconds, 1)))
    return found
