"""Whether one request can run to its end in a KV pool, even alone (pure: numbers in, numbers out).

The engine's scheduler refuses a request that could not (:meth:`engine.scheduler.Scheduler.check_fits`),
and the router refuses one that no decode worker's pool could hold before it is prefilled
(:mod:`router.pool_fit`), both with these functions, so the two agree on every request.
"""

from __future__ import annotations

from dataclasses import dataclass


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold ``num_tokens`` tokens (ceiling division)."""
    return -(-num_tokens // block_size)


def group_import_blocks(prefix_tokens: int, candidates: int, block_size: int) -> int:
    """KV blocks a parallel-sampling group handed off after ``prefix_tokens`` prompt tokens takes
    at once when ``candidates`` choices are forked over them (``LLMEngine.import_kv_group``): the
    prefix's blocks, shared, plus one per choice (its copy of the shared partial block, or the
    block its last prompt token opens)."""
    return blocks_for(prefix_tokens, block_size) + candidates


@dataclass(frozen=True)
class PoolShape:
    """What bounds one request in a KV pool: ``num_blocks`` blocks of ``block_size`` tokens, a
    context of ``max_model_len`` tokens, and ``sliding_window`` (tokens every layer attends to;
    None: full attention, every block is kept)."""

    num_blocks: int
    block_size: int
    max_model_len: int
    sliding_window: int | None = None

    def peak_blocks(
        self, prompt_tokens: int, max_tokens: int, prefill_only: bool = False, num_tokens: int | None = None
    ) -> int:
        """The most KV blocks a request of ``prompt_tokens`` prompt tokens and ``max_tokens``
        output tokens holds at once: its prompt plus ``max_tokens`` (at most the context; a
        prefill-only request stops after one token), and with a sliding window over every layer
        no more than the window's blocks plus the two partial ones at its edges (but never less
        than the tokens it holds now, written whole). ``num_tokens``: the tokens it holds now
        (prompt and outputs so far; default: its prompt, a fresh request)."""
        bs = self.block_size
        now = prompt_tokens if num_tokens is None else num_tokens
        if prefill_only:
            return blocks_for(now + 1, bs)
        need = blocks_for(min(prompt_tokens + max_tokens, self.max_model_len), bs)
        if self.sliding_window is not None:
            need = min(need, max(blocks_for(self.sliding_window, bs) + 2, blocks_for(now + 1, bs)))
        return need

    def prompt_fits(self, num_tokens: int) -> bool:
        """Whether ``num_tokens`` tokens (and the slot of the next one) fit the pool at all."""
        return blocks_for(num_tokens + 1, self.block_size) <= self.num_blocks

    def adopts_group(self, prompt_tokens: int, candidates: int) -> bool:
        """Whether the pool could ever adopt a group of ``candidates`` choices over a prompt of
        ``prompt_tokens`` tokens handed off by a prefill worker (every prompt token but the last:
        :func:`group_import_blocks`) at once. A pool that cannot may still run the group whole
        (its own prefill; choices preempted in turn when short of blocks)."""
        return group_import_blocks(prompt_tokens - 1, candidates, self.block_size) <= self.num_blocks

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a fresh request runs to its end alone in this pool (the scheduler's test)."""
        return (
            self.prompt_fits(prompt_tokens) and self.peak_blocks(prompt_tokens, max_tokens) <= self.num_blocks
        )
