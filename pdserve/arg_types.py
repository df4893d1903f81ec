"""argparse types shared by pdserve's command lines: a bad value is refused at parse time with
argparse's own one-line error (naming the flag), before any process starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)

MAX_PORT = 65535


def _checked(
    convert: Callable[[str], T], ok: Callable[[T], bool], expected: str, bad: str, name: str, doc: str
) -> Callable[[str], T]:
    """An argparse type: ``convert`` the text (its ValueError: "expected EXPECTED, got 'TEXT'"),
    then refuse a value ``ok`` rejects ("BAD, got TEXT")."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{bad}, got {text}")
        return value

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = doc
    return parse


port_number = _checked(
    int,
    lambda p: 0 <= p <= MAX_PORT,
    f"a port number (0-{MAX_PORT})",
    f"a port is 0-{MAX_PORT} (0: any free port)",
    "port_number",
    "A TCP port: 0 (any free port) to 65535.",
)

positive_seconds = _checked(
    float,
    lambda s: s > 0 and math.isfinite(s),
    "seconds (a number > 0)",
    "must be a finite number of seconds > 0",
    "positive_seconds",
    "A duration in seconds: a finite number > 0 (a deadline of 0 or less would expire before the "
    "request is sent).",
)

positive_int = _checked(
    int, lambda n: n >= 1, "a whole number >= 1", "must be >= 1", "positive_int", "A whole number >= 1."
)

fraction = _checked(
    float,
    lambda x: 0 < x <= 1,
    "a number in (0, 1]",
    "must be in (0, 1] (0.9 = 90%)",
    "fraction",
    "A share: a number in (0, 1] (an attainment target of 0.9 means 90%).",
)

positive_number = _checked(
    float,
    lambda x: x > 0 and math.isfinite(x),
    "a number > 0",
    "must be a finite number > 0",
    "positive_number",
    "A finite number > 0 (a rate, a bandwidth).",
)

non_negative_gib = _checked(
    float,
    lambda x: x >= 0 and math.isfinite(x),
    "a size in GiB (a number >= 0)",
    "must be a finite number of GiB >= 0 (0: off)",
    "non_negative_gib",
    "A size in GiB: a finite number >= 0 (0: off).",
)

non_negative_int = _checked(
    int, lambda n: n >= 0, "a whole number >= 0", "must be >= 0", "non_negative_int", "A whole number >= 0."
)

non_negative_seconds = _checked(
    float,
    lambda s: s >= 0 and math.isfinite(s),
    "seconds (a number >= 0)",
    "must be a finite number of seconds >= 0",
    "non_negative_seconds",
    "A wait in seconds: a finite number >= 0 (0: do not wait).",
)
