"""Where a request's time goes, as its client saw it (#12's serving-efficiency bench).

From the per-request :class:`bench.cluster_load.RequestTiming` of a closed-loop run:

* ``to_first``: sent -> first message (the first token; with direct streams it comes through the
  router, from the prefill);
* ``first_to_second``: first -> second message (with direct streams: the redirect, the attach and
  the decode worker's first window);
* ``per_token``: from the second message to the last, divided by the tokens that arrived after
  the second message (the decode's pace as delivered);
* ``after_last``: last message -> the call's end (the finish);
* ``outside_share``: (``to_first`` + ``first_to_second`` + ``after_last``) / the whole request:
  the share of a closed-loop stream's time its request is not streaming tokens. With C streams,
  about C x this share are outside the decode batch at any moment;
* ``before_router``: ``to_first`` less the TTFT the request's finish reports (the router's, from
  when it took the request): the time from the client's send to the router taking it, plus the
  first token's way back (requests whose finish carried no TTFT are not counted; None when none
  did);
* ``burst``: the size of the burst each request was sent in (a send at most
  :data:`BURST_GAP_S` after the one before it joins that one's burst). A closed loop of requests
  of one length sends in bursts: those that started together end in the same decode step, and
  their streams send the next ones at once. A router takes a burst one request at a time, so a
  large ``before_router`` beside a large ``burst`` is that wait, not the token path.

Each figure is a median and a 90th percentile over the requests. Pure: no I/O.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

BURST_GAP_S = 0.05  # a send at most this long after the previous one is in the same burst


class _Timing(Protocol):
    start: float
    messages: tuple[tuple[float, int], ...]
    end: float
    router_ttft: float | None


@dataclass(frozen=True)
class Spread:
    """Median and 90th percentile (nearest rank) of a set of values, in seconds."""

    median: float
    p90: float

    @staticmethod
    def of(values: Sequence[float]) -> Spread:
        """The spread of ``values``; ValueError when there are none."""
        if not values:
            raise ValueError("Spread.of: no values")
        v = sorted(values)
        return Spread(statistics.median(v), v[min(len(v) - 1, max(0, -(-9 * len(v) // 10) - 1))])


@dataclass(frozen=True)
class Phases:
    """Per-request phases of a run (see the module docstring); ``requests``: how many requests
    had at least two messages (the others are not counted)."""

    requests: int
    to_first: Spread
    first_to_second: Spread
    per_token: Spread
    after_last: Spread
    total: Spread
    outside_share: Spread
    burst: Spread
    before_router: Spread | None


def burst_sizes(starts: Sequence[float], gap_s: float = BURST_GAP_S) -> list[int]:
    """For each send time of ``starts`` (any order), the size of its burst: sends sorted by
    time, each at most ``gap_s`` after the one before it joins that one's burst."""
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    sizes = [0] * len(starts)
    run: list[int] = []
    for i in order:
        if run and starts[i] - starts[run[-1]] > gap_s:
            for j in run:
                sizes[j] = len(run)
            run = []
        run.append(i)
    for j in run:
        sizes[j] = len(run)
    return sizes


def request_phases(timings: Sequence[_Timing]) -> Phases | None:
    """The phases of ``timings``. Requests with fewer than two messages, or that took no time,
    are left out; ``per_token`` counts only requests with a token after their second message
    (0.0 when none has). None when no request is left."""
    first, second, per_tok, after, total, outside, before, burst = [], [], [], [], [], [], [], []
    sizes = burst_sizes([t.start for t in timings])
    for t, size in zip(timings, sizes, strict=True):
        m = t.messages
        whole = t.end - t.start
        if len(m) < 2 or whole <= 0:
            continue
        burst.append(float(size))
        first.append(m[0][0] - t.start)
        if t.router_ttft is not None:
            before.append(first[-1] - t.router_ttft)
        second.append(m[1][0] - m[0][0])
        later = sum(n for _, n in m[2:])
        if later > 0:
            per_tok.append((m[-1][0] - m[1][0]) / later)
        after.append(t.end - m[-1][0])
        total.append(whole)
        outside.append((first[-1] + second[-1] + after[-1]) / whole)
    if not total:
        return None
    return Phases(
        len(total),
        Spread.of(first),
        Spread.of(second),
        Spread.of(per_tok) if per_tok else Spread(0.0, 0.0),
        Spread.of(after),
        Spread.of(total),
        Spread.of(outside),
        Spread.of(burst),
        Spread.of(before) if before else None,
    )


def phases_lines(p: Phases) -> list[str]:
    """Human-readable lines (milliseconds; the per-token pace in microseconds)."""

    def ms(s: Spread) -> str:
        return f"median {s.median * 1e3:8.1f} ms  p90 {s.p90 * 1e3:8.1f} ms"

    lines = [
        f"sent -> first token      {ms(p.to_first)}",
        f"first -> second message  {ms(p.first_to_second)}",
        f"per token after that     median {p.per_token.median * 1e6:8.1f} us  p90 {p.per_token.p90 * 1e6:8.1f} us",
        f"last message -> end      {ms(p.after_last)}",
        f"whole request            {ms(p.total)}",
        f"share outside streaming  median {p.outside_share.median:.3f}  p90 {p.outside_share.p90:.3f}"
        f"  ({p.requests} requests)",
    ]
    if p.before_router is not None:
        lines.append(f"before the router's TTFT {ms(p.before_router)}  (send -> router, first token back)")
    lines.append(
        f"sent in a burst of       median {p.burst.median:8.1f}     p90 {p.burst.p90:8.1f}"
        f"     (sends <= {BURST_GAP_S * 1e3:g} ms apart)"
    )
    return lines
