"""Start a local cluster's processes: each prints one JSON ready line (its address) once it serves.

:func:`start` starts one process and :func:`await_ready` waits for its ready line (the launcher's
``_spawn`` is the two). :func:`spawn_chains` starts several *chains* at once: the processes of one
chain start one after another (the next when the one before has printed its ready line), the
chains side by side. :func:`pdserve.launcher.launch` starts the
prefill workers and the decode workers as two chains, so the two kinds import torch and load their
model at the same time, while the workers of one kind still start, and so register with the
router, in the order they are named (the router breaks placement ties by registration order).

Failure contract (both): a process that exits without a ready line, or prints none within
``timeout_s`` of its own start, raises UnavailableError naming it, with its own error line and its
last output. Before raising, the whole cluster is stopped (``stop_on_failure``, the default), or
only the failed process is killed. With several chains the first failure seen is raised and no
further process is started.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pdserve.errors import UnavailableError

POLL_S = 0.1  # how often a wait checks whether a starting process has exited


class Cluster(Protocol):
    """What starting a process records on its cluster (:class:`pdserve.launcher.LocalCluster`)."""

    procs: dict[str, subprocess.Popen]
    argv: dict[str, list[str]]
    logs: dict[str, list[str]]
    metrics: dict[str, str]

    def stop(self) -> None: ...


@dataclass
class Starting:
    """One process between its start and its ready line."""

    name: str
    proc: subprocess.Popen
    timeout_s: float  # from its start: no ready line by then is a failure
    deadline: float  # monotonic: its start + timeout_s
    lines: list[str]  # its output so far (the cluster's log of it)
    ready: dict = field(default_factory=dict)  # its ready line, once printed
    got: threading.Event = field(default_factory=threading.Event)  # ready line seen, or output ended
    pumper: threading.Thread | None = None


def ready_info(line: str) -> dict | None:
    """The ready line's JSON object (it has "address"); None for anything else, JSON logs included."""
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) and "address" in obj and "msg" not in obj else None


def error_line(lines: list[str]) -> str:
    """The child's own account of its failure: the last ``<prog>: error: ...`` line it printed
    (argparse and the workers' start-up failures), else the last exception line of a traceback,
    else its last line."""
    for line in reversed(lines):
        if ": error: " in line and not line.startswith("{"):
            return line
    for line in reversed(lines):
        if line and not line[0].isspace() and ("Error" in line or "Exception" in line) and ": " in line:
            return line
    return lines[-1] if lines else "(no output)"


def start(
    cluster: Cluster,
    name: str,
    args: list[str],
    timeout_s: float,
    env: dict[str, str],
    cwd: Path,
    wake: threading.Event | None = None,
) -> Starting:
    """Start ``python args`` as process ``name`` of ``cluster`` (recorded in its procs, argv and
    logs) with its output read on a thread of its own; returns at once. ``wake`` (optional) is set
    when its ready line arrives or its output ends."""
    p = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
    )
    cluster.procs[name] = p
    cluster.argv[name] = list(args)
    lines: list[str] = []
    cluster.logs[name] = lines
    s = Starting(name, p, timeout_s, time.monotonic() + timeout_s, lines)

    def pump() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip())
            info = None if s.got.is_set() else ready_info(line)
            if info is not None:
                s.ready.update(info)
                s.got.set()
                if wake is not None:
                    wake.set()
        p.stdout.close()
        s.got.set()
        if wake is not None:
            wake.set()

    s.pumper = threading.Thread(target=pump, daemon=True, name=f"log-{name}")
    s.pumper.start()
    return s


def _state(s: Starting) -> int | bool | None:
    """True: ready; an int: exited (its status) with no ready line; False: its output ended without
    a ready line while it still runs (it is exiting); None: still starting.

    ``got`` is read before ``ready``: the pump fills ``ready`` and then sets ``got``, so a ``got``
    seen set means ``ready`` is final by the time it is read (read the other way round, a ready
    line arriving between the two reads looked like output that ended without one)."""
    ended = s.got.is_set()
    if s.ready:
        return True
    code = s.proc.poll()
    if code is not None:
        return code
    return False if ended else None


def _fail(cluster: Cluster, s: Starting, state: int | bool | None, stop_on_failure: bool) -> UnavailableError:
    """Stop what has to stop after ``s`` failed to start (``state`` as :func:`_state`; None: it
    timed out) and the error that names it."""
    exit_code = state if isinstance(state, int) and not isinstance(state, bool) else None
    if exit_code is not None and s.pumper is not None:
        s.pumper.join(2.0)  # the rest of what it wrote (a grandchild may hold the pipe open)
    elif state is False:
        with contextlib.suppress(subprocess.TimeoutExpired):
            exit_code = s.proc.wait(5.0)
    if stop_on_failure:
        cluster.stop()
    elif s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()
    tail = "\n".join(s.lines[-20:])
    if exit_code is not None:
        return UnavailableError(
            f"{s.name} exited with status {exit_code} before it was ready: {error_line(s.lines)}\n"
            f"its last output:\n{tail}"
        )
    return UnavailableError(f"{s.name} did not start within {s.timeout_s}s:\n{tail}")


def _ready(cluster: Cluster, s: Starting) -> dict:
    if "metrics" in s.ready:
        cluster.metrics[s.name] = s.ready["metrics"]
    return s.ready


def await_ready(cluster: Cluster, s: Starting, stop_on_failure: bool = True) -> dict:
    """Wait for ``s``'s ready line (module doc: the failure contract); the ready line."""
    while True:
        state = _state(s)
        if state is True:
            return _ready(cluster, s)
        if state is not None or time.monotonic() >= s.deadline:
            raise _fail(cluster, s, state, stop_on_failure)
        s.got.wait(min(POLL_S, max(0.0, s.deadline - time.monotonic())))


def spawn_chains(
    cluster: Cluster,
    chains: Sequence[Sequence[tuple[str, list[str]]]],
    timeout_s: float,
    starter: Callable[[Cluster, str, list[str], float, threading.Event], Starting],
) -> dict[str, dict]:
    """Start every chain of ``(name, args)`` at once, each chain's processes one after another
    (module doc); every process's ready line by name. ``starter(cluster, name, args, timeout_s,
    wake)`` starts one (:func:`start` with the cluster's environment). A failure stops the whole
    cluster and raises (module doc)."""
    wake = threading.Event()
    todo = [list(c) for c in chains if c]
    running: list[tuple[int, Starting]] = []
    out: dict[str, dict] = {}
    for i, chain in enumerate(todo):
        name, args = chain.pop(0)
        running.append((i, starter(cluster, name, args, timeout_s, wake)))
    while running:
        wake.clear()
        still: list[tuple[int, Starting]] = []
        for i, s in running:
            state = _state(s)
            if state is True:
                out[s.name] = _ready(cluster, s)
                if todo[i]:
                    name, args = todo[i].pop(0)
                    still.append((i, starter(cluster, name, args, timeout_s, wake)))
            elif state is not None or time.monotonic() >= s.deadline:
                raise _fail(cluster, s, state, stop_on_failure=True)
            else:
                still.append((i, s))
        running = still
        if running:
            wake.wait(POLL_S)
    return out
