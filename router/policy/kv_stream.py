"""The KV handoff's time after the prefill, with and without chunk-wise streaming (pure; issue
#14 part 2; shared by the router's estimates and the simulator).

Non-streamed, the whole prompt's KV moves after the prompt is computed: ``transfer(P tokens)``.
Streamed (:mod:`prefill_worker.kv_stream`), chunk ``k`` of the prefill (``c_k`` tokens on top of
``s_k`` already computed) is published as soon as its engine step ends and moves while the next
chunks compute. With one link per handoff (chunks move one after the other) the transfers form a
two-stage pipeline:

    compute_end_k  = compute_end_{k-1} + prefill_time([c_k], [s_k])
    transfer_end_k = max(transfer_end_{k-1}, compute_end_k) + transfer(c_k tokens)
    residual       = transfer_end_last - compute_end_last

When the link keeps up (each chunk's transfer no longer than the next chunk's compute), the
residual is the last chunk's transfer only; when it does not, the backlog adds up and the
residual grows towards the whole transfer minus the prefill. Blocks reused from the prefix cache
are final at the first step, so they travel with the first chunk. Each chunk pays the transfer's
fixed cost (``transfer_time`` of its bytes, latency included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.policy.protocols import LatencyEstimator


@dataclass(frozen=True)
class HandoffEstimate:
    """Seconds of the KV handoff left after the prefill ends, streamed and not, and the chunks."""

    whole_s: float  # non-streamed: the whole KV after the prefill
    streamed_s: float  # streamed: what is left after the prompt's last chunk
    num_chunks: int

    @property
    def ratio(self) -> float:
        """streamed / whole (<= 1 whenever the chunks' fixed costs are small)."""
        return self.streamed_s / self.whole_s if self.whole_s > 0 else 0.0


def pipeline_residual(compute_s: Sequence[float], transfer_s: Sequence[float]) -> float:
    """Transfer time left after the last chunk's compute ends (see the module docstring);
    ``compute_s[k]`` / ``transfer_s[k]``: chunk k's compute and transfer seconds."""
    if len(compute_s) != len(transfer_s):
        raise ValueError(f"{len(compute_s)} compute times for {len(transfer_s)} transfers")
    if any(x < 0 for x in compute_s) or any(x < 0 for x in transfer_s):
        raise ValueError("times must be >= 0")
    comp = link = 0.0
    for c, x in zip(compute_s, transfer_s, strict=True):
        comp += c
        link = max(link, comp) + x
    return max(0.0, link - comp)


def chunk_sizes(num_prompt_tokens: int, reused_tokens: int, chunk_tokens: int) -> list[tuple[int, int, int]]:
    """The prefill's chunks as ``(computed tokens, context before, tokens published)``: the
    computed tokens in chunks of ``chunk_tokens``; reused tokens publish with the first chunk."""
    if num_prompt_tokens <= 0 or chunk_tokens <= 0:
        raise ValueError(
            f"num_prompt_tokens and chunk_tokens must be > 0, got {num_prompt_tokens}, {chunk_tokens}"
        )
    reused = max(0, min(reused_tokens, num_prompt_tokens - 1))  # at least one token is computed
    out: list[tuple[int, int, int]] = []
    done = reused
    while done < num_prompt_tokens:
        c = min(chunk_tokens, num_prompt_tokens - done)
        out.append((c, done, c + (reused if not out else 0)))
        done += c
    return out


def handoff_after_prefill(
    latency: LatencyEstimator, num_prompt_tokens: int, reused_tokens: int = 0, chunk_tokens: int = 512
) -> HandoffEstimate:
    """The handoff left after the prefill of a ``num_prompt_tokens`` prompt (``reused_tokens``
    from the prefix cache) in chunks of ``chunk_tokens``, streamed and not."""
    per_token = latency.kv_bytes_per_token
    whole = latency.transfer_time(num_prompt_tokens * per_token)
    chunks = chunk_sizes(num_prompt_tokens, reused_tokens, chunk_tokens)
    compute = [latency.prefill_time([c], [ctx]) for c, ctx, _ in chunks]
    transfer = [latency.transfer_time(pub * per_token) for _, _, pub in chunks]
    return HandoffEstimate(whole, pipeline_residual(compute, transfer), len(chunks))
