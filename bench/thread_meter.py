"""Where a process's threads spend a run: on a CPU, waiting for one, or blocked (#12).

For each thread of a process, ``/proc/<pid>/task/<tid>/schedstat`` gives the nanoseconds it ran
and the nanoseconds it was runnable but waiting for a CPU (run delay); over a window of wall
time, the rest is time it was blocked: sleeping on a lock, a condition or a socket. For a thread
that always has work (the decode worker's engine thread in a saturated closed loop) the blocked
time is the time it waited for the GIL (Python releases it around every native call and must
take it back from whichever thread holds it then), plus any idle waits for work.

Pure parts (:func:`parse_schedstat`, :func:`thread_split`) are separate from the ``/proc``
readers (:func:`sample_threads`). Linux only; a thread that ended inside the window is left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadSample:
    """One thread's counters at one moment: CPU and run-delay nanoseconds (schedstat)."""

    tid: int
    name: str
    cpu_ns: int
    run_delay_ns: int


@dataclass(frozen=True)
class ThreadSplit:
    """One thread over a window of ``wall_s``: seconds on a CPU, waiting for a CPU, blocked."""

    tid: int
    name: str
    wall_s: float
    cpu_s: float
    run_delay_s: float

    @property
    def blocked_s(self) -> float:
        """Wall time neither running nor runnable (never below 0: counters and the wall clock
        are read a few microseconds apart)."""
        return max(0.0, self.wall_s - self.cpu_s - self.run_delay_s)


def parse_schedstat(text: str) -> tuple[int, int]:
    """(CPU ns, run-delay ns) from a ``schedstat`` line ("<cpu ns> <run delay ns> <slices>");
    ValueError naming the text when it is not that."""
    parts = text.split()
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        raise ValueError(f"not a schedstat line: {text!r}")
    return int(parts[0]), int(parts[1])


def sample_threads(pid: int) -> dict[int, ThreadSample]:
    """Every live thread of process ``pid``: tid -> its sample (threads that end while read are
    skipped). OSError when the process is gone."""
    out: dict[int, ThreadSample] = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                cpu, delay = parse_schedstat(f.read())
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                name = f.read().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(t)] = ThreadSample(int(t), name, cpu, delay)
    return out


def thread_split(
    before: dict[int, ThreadSample], after: dict[int, ThreadSample], wall_s: float
) -> list[ThreadSplit]:
    """Each thread alive at both samples, busiest (most CPU) first, over ``wall_s``."""
    if wall_s <= 0:
        raise ValueError(f"wall_s must be > 0, got {wall_s}")
    rows = [
        ThreadSplit(
            tid,
            a.name,
            wall_s,
            (a.cpu_ns - before[tid].cpu_ns) / 1e9,
            (a.run_delay_ns - before[tid].run_delay_ns) / 1e9,
        )
        for tid, a in after.items()
        if tid in before
    ]
    return sorted(rows, key=lambda r: r.cpu_s, reverse=True)
