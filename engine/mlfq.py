"""Skip-join multi-level feedback queue (FastServe), the pure rules. No clock, no I/O.

Levels ``0 .. num_levels-1``; 0 is served first. Level ``i`` has a time quantum
``base_prefill_s * 2**i`` (for skip-join) and a quantum of ``quantum_iters * 2**i`` decode
iterations (for demotion):

* skip-join: a request enters the first level whose time quantum covers its predicted prefill
  time (:func:`skip_join_level`), so a long prompt does not sit at the top ahead of short jobs;
* demotion: after a level's quantum of iterations (steps that sampled a token) the request moves
  down one level (:func:`demote`);
* anti-starvation (aging): a queued request that has not been served for ``starvation_s`` rises
  ``promote_levels`` levels (:func:`is_starving`, :func:`promote`) and its wait restarts, so it
  reaches level 0 after at most ``ceil(level / promote_levels)`` such periods. One level at a
  time (the default) bounds starvation without turning every old job into a top-level one: a
  jump straight to level 0 puts the oldest queued jobs ahead of every fresh arrival (the queue
  orders by level, then arrival), which under sustained load degenerates into FCFS plus the
  preemption traffic (bench/mlfq_jct.py: 30.98 s vs FCFS's 26.75 s mean JCT at load 1.3);
* preemption keeps the victim's KV (:func:`preemptible`): a higher-level job takes a lower
  one's place only when the victim's KV is swapped out or stays in the prefix cache, never by
  discarding computed KV (that is recomputed at everyone's expense and, with memory binding,
  thrashes);
* swap backoff (:func:`swap_backoff_iters`): a request swapped out and back in is not
  preempted by the policy for a number of scheduler iterations that doubles with each of its
  swaps, so a long job is not swapped out and back at every higher-level arrival (ping-pong:
  each round trip copies its KV twice and it makes no progress in between).

:class:`engine.scheduler.Scheduler` applies these with ``SchedulingPolicy.MLFQ``.
"""

from __future__ import annotations

import math


def skip_join_level(predicted_prefill_s: float, base_prefill_s: float, num_levels: int) -> int:
    """The first level ``i`` with ``predicted_prefill_s <= base_prefill_s * 2**i`` (the last
    level when none)."""
    if num_levels < 1 or base_prefill_s <= 0:
        raise ValueError("num_levels must be >= 1 and base_prefill_s > 0")
    if not predicted_prefill_s > base_prefill_s:  # also NaN -> top level
        return 0
    i = math.ceil(math.log2(predicted_prefill_s / base_prefill_s) - 1e-12)
    return min(max(i, 0), num_levels - 1)


def quantum_iters(level: int, base_iters: int) -> int:
    """Decode iterations a request gets at ``level`` before it is demoted."""
    return base_iters << level


def demote(level: int, iters: int, base_iters: int, num_levels: int) -> tuple[int, int]:
    """``(level, iters)`` after one more iteration at ``level`` having run ``iters`` there."""
    iters += 1
    if iters >= quantum_iters(level, base_iters) and level < num_levels - 1:
        return level + 1, 0
    return level, iters


def is_starving(now: float, last_served: float, starvation_s: float) -> bool:
    """Whether a queued request last served at ``last_served`` has waited past the bound."""
    return now - last_served >= starvation_s


def promote(level: int, promote_levels: int) -> int:
    """The level of a starving request at ``level`` after one starvation period."""
    if promote_levels < 1:
        raise ValueError(f"promote_levels must be >= 1, got {promote_levels}")
    return max(level - promote_levels, 0)


def preemptible(tokens_lost: int, block_size: int) -> bool:
    """Whether the policy may preempt a running request for a higher-level one, given the
    tokens its re-admission would compute again (0 when its KV is swapped out): only when its
    KV survives the preemption, on the host or in the device prefix cache (at most the partial
    last block, ``< block_size`` tokens, is recomputed).

    FastServe preempts by swapping KV out proactively, never by discarding it. A preemption
    that drops a victim's KV is paid in GPU time by everyone (its prompt and output so far are
    recomputed) and, with memory binding, the victim re-admitted for lack of anything better
    is dropped again before it gets anywhere (thrash: each drop for a short job costs more
    than the short job). Such a higher-level request waits for blocks instead, as under FCFS;
    dropping a request because running ones need its blocks is not a policy choice and is not
    governed by this rule."""
    return tokens_lost < block_size


def swap_backoff_iters(num_swaps: int, base_iters: int, max_iters: int) -> int:
    """Scheduler iterations during which a request swapped out ``num_swaps`` times that just
    came back may not be preempted again by the policy: ``base_iters * 2**(k-1)`` for ``k >= 1``
    swaps, at most ``max_iters``; 0 before any swap or with ``base_iters == 0`` (backoff off).
    Preemption because running requests need its blocks is not a policy choice and ignores this."""
    if base_iters < 0 or max_iters < 0:
        raise ValueError("base_iters and max_iters must be >= 0")
    if num_swaps < 1 or base_iters == 0:
        return 0
    return min(base_iters << min(num_swaps - 1, 62), max_iters)


def waited_enough(waited_s: float, iteration_s: float | None, wait_iters: int) -> bool:
    """Whether a queued request that has waited ``waited_s`` (since its arrival or its last
    step) may preempt a lower-level one: after ``wait_iters`` iterations of ``iteration_s``
    (the measured iteration time; unknown: at once; ``wait_iters == 0``: at once).

    Ski rental: a preemption costs the victim a swap out and back and its seat until the
    preemptor is done, while a batch of ``B`` seats with short jobs frees one every few
    iterations. Waiting a few iterations first lets the seat turnover admit the queued job
    where it is quick (low load: live, batch 4, MLFQ preempted 80 times where FCFS never did and
    its mean JCT was 1.17x FCFS's) and costs a short job only those iterations where the queue
    is long (under sustained load a queued job waits hundreds of iterations under FCFS)."""
    if wait_iters < 0:
        raise ValueError(f"wait_iters must be >= 0, got {wait_iters}")
    if wait_iters == 0 or iteration_s is None:
        return True
    return waited_s >= wait_iters * iteration_s
