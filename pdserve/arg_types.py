"""argparse types shared by pdserve's command lines: a bad value is refused at parse time with
argparse's own one-line error (naming the flag), before any process starts."""

from __future__ import annotations

import argparse
import math

MAX_PORT = 65535


def port_number(text: str) -> int:
    """A TCP port: 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number (0-{MAX_PORT}), got {text!r}") from None
    if not 0 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"a port is 0-{MAX_PORT} (0: any free port), got {port}")
    return port


def positive_seconds(text: str) -> float:
    """A duration in seconds: a finite number > 0 (a deadline of 0 or less would expire before
    the request is sent)."""
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number > 0), got {text!r}") from None
    if not (s > 0 and math.isfinite(s)):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return s


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def fraction(text: str) -> float:
    """A share: a number in (0, 1] (an attainment target of 0.9 means 90%)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (0.9 = 90%), got {text}")
    return x


def positive_number(text: str) -> float:
    """A finite number > 0 (a rate, a bandwidth)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return x


def non_negative_gib(text: str) -> float:
    """A size in GiB: a finite number >= 0 (0: off)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in GiB (a number >= 0), got {text!r}") from None
    if not (x >= 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a finite number of GiB >= 0 (0: off), got {text}")
    return x
