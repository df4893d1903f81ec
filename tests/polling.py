"""Polling helper of the integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> float:
    """Poll ``cond`` until true; returns the seconds it took (fails naming ``what`` after ``timeout_s``)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s}s")
        time.sleep(interval_s)
    return time.monotonic() - t0
