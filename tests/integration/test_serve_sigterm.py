"""``pdserve serve`` stopped by SIGTERM while it is still starting its cluster leaves nothing
running. Before, the SIGTERM handler was installed only once the cluster was up: a SIGTERM during
start-up (``pkill``, a service manager stopping it) ended the process with the default action and
left the store (and whatever else had started) running, orphaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_while_starting_stops_what_started(smollm_path) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "serve", "--model", str(smollm_path), "--tls", "off"]
        + ["--address", "127.0.0.1:0"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        kids: set[int] = set()
        while not kids and time.monotonic() < deadline and p.poll() is None:
            kids = _children(p.pid)  # the store starts first
            time.sleep(0.05)
        assert kids, "pdserve serve started no process"
        kids |= _children(p.pid)
        os.kill(p.pid, signal.SIGTERM)  # while it is still starting
        err = p.communicate(timeout=60)[1]
        assert "stopped (SIGTERM) while starting; nothing is left running" in err, err
        assert p.returncode == 143
        deadline = time.monotonic() + 30
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [k for k in kids if _alive(k)], "processes left running after SIGTERM"
    finally:
        if p.poll() is None:
            p.kill()
        for k in _children(p.pid):
            os.kill(k, signal.SIGKILL)
