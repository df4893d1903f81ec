"""The skip-join MLFQ scheduler's knobs (issue #15) as one table, for every front end.

Each :class:`MlfqKnob` is an ``EngineConfig`` ``mlfq_*`` field; the worker flags
(``pdserve.worker_main``), ``pdserve serve``'s flags (``pdserve.cli``) and the Ray pool keys
(``pdserve.cluster_config.PoolConfig``) are all built from :data:`KNOBS`, with the same range
check (:meth:`MlfqKnob.problem`, the scheduler's own bounds, ``engine.scheduler.SchedulerConfig``).
A knob is only read by the MLFQ policy: a flag given without ``--scheduling-policy mlfq`` is
refused (:func:`flags_without_mlfq`), never silently ignored.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields

from engine.config import EngineConfig


@dataclass(frozen=True)
class MlfqKnob:
    """One knob: ``field`` (EngineConfig's name, also the pool key), its type, its bounds
    (``minimum``, strict when ``above``; ``maximum`` inclusive, None: none) and a help line."""

    field: str
    kind: type  # int or float
    minimum: float
    above: bool = False  # strictly above minimum
    maximum: float | None = None
    finite: bool = True
    metavar: str = "N"
    help: str = ""

    @property
    def flag(self) -> str:
        """The command-line flag: ``--mlfq-num-levels`` for ``mlfq_num_levels``."""
        return "--" + self.field.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.field

    @property
    def default(self) -> int | float:
        """EngineConfig's default (the engine's own, one source)."""
        return _ENGINE_DEFAULTS[self.field]

    def problem(self, v: object) -> str | None:
        """Why ``v`` is out of range ("must be >= 1, got 0"), or None when it is fine."""
        if self.kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            return f"must be an integer, got {v!r}"
        if self.kind is float and (isinstance(v, bool) or not isinstance(v, int | float)):
            return f"must be a number, got {v!r}"
        x = float(v)  # type: ignore[arg-type]
        if math.isnan(x) or (self.finite and not math.isfinite(x)):
            return f"must be a finite number, got {v!r}"
        lo = f"> {self.minimum:g}" if self.above else f">= {self.minimum:g}"
        if self.maximum is not None:
            rng = (
                f"in ({self.minimum:g}, {self.maximum:g}]"
                if self.above
                else f"in [{self.minimum:g}, {self.maximum:g}]"
            )
            if not ((x > self.minimum if self.above else x >= self.minimum) and x <= self.maximum):
                return f"must be {rng}, got {v}"
            return None
        if not (x > self.minimum if self.above else x >= self.minimum):
            return f"must be {lo}, got {v}"
        return None


_ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineConfig) if f.name.startswith("mlfq_")}


def default(field: str) -> int | float:
    """EngineConfig's default of ``mlfq_*`` field ``field`` (the one source every front end's
    default reads: ``PoolConfig``'s fields, the flags' help); KeyError for an unknown field."""
    return _ENGINE_DEFAULTS[field]


KNOBS: tuple[MlfqKnob, ...] = (
    MlfqKnob("mlfq_num_levels", int, 1, help="queue levels"),
    MlfqKnob(
        "mlfq_quantum_iters",
        int,
        1,
        help="decode iterations a request runs at level 0 before demotion (level i: N * 2**i)",
    ),
    MlfqKnob(
        "mlfq_base_prefill_s",
        float,
        0.0,
        above=True,
        metavar="S",
        help="skip-join: level i admits prompts whose predicted prefill is <= S * 2**i seconds",
    ),
    MlfqKnob(
        "mlfq_starvation_s",
        float,
        0.0,
        above=True,
        finite=False,
        metavar="S",
        help="a request queued this long without service is promoted (anti-starvation; inf: never)",
    ),
    MlfqKnob(
        "mlfq_swap_watermark",
        float,
        0.0,
        above=True,
        maximum=1.0,
        metavar="F",
        help="preempt lower levels before the KV pool passes this fraction (1: only when a queued "
        "request does not fit)",
    ),
    MlfqKnob(
        "mlfq_swap_backoff_iters",
        int,
        0,
        help="a request swapped out and back is not preempted again for N iterations, doubling with "
        "each swap (0: off)",
    ),
    MlfqKnob(
        "mlfq_swap_backoff_max_iters",
        int,
        0,
        help="the most iterations the swap backoff grows to",
    ),
    MlfqKnob(
        "mlfq_preempt_wait_iters",
        int,
        0,
        help="a queued request preempts a running request of a lower level only after waiting N "
        "engine iterations (0: at once)",
    ),
)
"""Every ``EngineConfig`` ``mlfq_*`` field (``test_mlfq_config`` checks none is missing)."""


def add_flags(ap: argparse.ArgumentParser | argparse._ArgumentGroup, default_note: str) -> None:
    """Add every knob's flag to ``ap`` (default None: the engine's); ``default_note`` words the
    default ("the engine's" / "the workers' default")."""
    for k in KNOBS:
        ap.add_argument(
            k.flag,
            type=k.kind,
            default=None,
            metavar=k.metavar,
            help=f"with --scheduling-policy mlfq: {k.help} (default: {default_note}, {k.default:g})",
        )


def flag_errors(a: argparse.Namespace, scheduling_policy: str | None) -> list[str]:
    """What is wrong with the knob flags on ``a``: a value out of range ("--mlfq-num-levels must
    be >= 1, got 0"), or a flag given without ``--scheduling-policy mlfq``; empty when fine."""
    errs = []
    for k in KNOBS:
        v = getattr(a, k.dest)
        if v is None:
            continue
        why = k.problem(v)
        if why is not None:
            errs.append(f"{k.flag} {why}")
        elif scheduling_policy != "mlfq":
            errs.append(f"{k.flag} needs --scheduling-policy mlfq")
    return errs


def given(a: argparse.Namespace) -> dict[str, int | float]:
    """The knobs given on ``a`` as EngineConfig keyword arguments."""
    return {k.field: getattr(a, k.dest) for k in KNOBS if getattr(a, k.dest) is not None}


def as_flags(a: argparse.Namespace) -> tuple[str, ...]:
    """The knobs given on ``a`` as worker flags (``pdserve serve`` forwards them)."""
    out: list[str] = []
    for k in KNOBS:
        v = getattr(a, k.dest)
        if v is not None:
            out += [k.flag, repr(v) if k.kind is float else str(v)]
    return tuple(out)
