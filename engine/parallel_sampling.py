"""Parallel sampling (``SamplingParams.n > 1`` / ``best_of``): one prefill, forked choices (pure).

A request with ``num_candidates = best_of or n > 1`` becomes a :class:`SampleGroup`:

1. A hidden *parent* request (id :meth:`SampleGroup.parent_id`) prefills every prompt token but
   the last, prefill-only (its sampled token is discarded).
2. The parent's blocks are forked (``KVCacheManager.fork``) into ``num_candidates`` *choice*
   requests (ids :meth:`SampleGroup.child_id`) sharing them by reference count; each choice
   computes the last prompt token itself, writing it into its own copy of the shared partial
   block (copy-on-write), samples its first token, and decodes independently.
3. Candidate ``i`` samples with seed ``seed + i`` (a random base seed when the request has
   none): it is token for token the request run alone with ``n=1, best_of=None`` and that seed
   (its prompt KV is the same; the sampler's noise depends only on seed and output position).
4. ``best_of == n``: each choice streams as it decodes, ``RequestOutput.choice_index = i``.
   ``best_of > n``: nothing is streamed; when every candidate has finished, the ``n`` with the
   highest cumulative logprob (ties: lower candidate index first) are returned, finished, with
   ``choice_index`` = rank (0 = best), whole text and tokens in that one output.

A one-token prompt has nothing to share: its choices start unforked (each prefills its token).
Aborting the request id aborts the parent and every choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

_SEP = "\x1f"  # unit separator: never part of an id a client sends through the front ends


def is_internal_id(request_id: str) -> bool:
    """Whether an id names a parallel-sampling parent or choice (not a client request id)."""
    return _SEP in request_id


@dataclass
class _Candidate:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    final: RequestOutput | None = None


@dataclass
class SampleGroup:
    """Bookkeeping of one parallel-sampling request: ids, per-candidate parameters, and the
    best_of selection. ``base_seed``: the seed of candidate 0."""

    request_id: str
    params: SamplingParams
    base_seed: int
    candidates: list[_Candidate] = field(default_factory=list)
    forked: bool = False

    def __post_init__(self) -> None:
        self.candidates = [_Candidate() for _ in range(self.params.num_candidates)]

    @property
    def num_candidates(self) -> int:
        return self.params.num_candidates

    @property
    def buffers(self) -> bool:
        """True when outputs are held back until every candidate finished (``best_of > n``)."""
        return self.params.num_candidates > self.params.n

    @property
    def parent_id(self) -> str:
        return f"{self.request_id}{_SEP}prefill"

    def child_id(self, i: int) -> str:
        return f"{self.request_id}{_SEP}{i}"

    def child_params(self, i: int) -> SamplingParams:
        """Candidate ``i``'s parameters: the request's with ``n=1``, seed ``base_seed + i`` and,
        for ``best_of > n``, at least the sampled token's logprob (for the ranking)."""
        lp = self.params.logprobs
        if self.buffers and lp is None:
            lp = 0
        return replace(self.params, n=1, best_of=None, seed=self.base_seed + i, logprobs=lp)

    def parent_params(self) -> SamplingParams:
        """The parent's: greedy, one token (discarded), no logprobs."""
        return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def on_output(self, i: int, out: RequestOutput) -> list[RequestOutput]:
        """Take candidate ``i``'s step output (``request_id`` already the client's); return what
        the client sees now: the output itself (``best_of == n``), nothing, or, once the last
        candidate finished under ``best_of > n``, the ``n`` best, ranked."""
        c = self.candidates[i]
        c.tokens = list(out.token_ids)
        c.logprobs.extend(out.logprobs)
        c.cumulative_logprob = sum(lp.logprob for lp in c.logprobs)
        if not self.buffers:
            out.choice_index = i
            if self.params.logprobs is not None:
                out.cumulative_logprob = c.cumulative_logprob
            return [out]
        if out.finished:
            c.final = out
        if any(x.final is None for x in self.candidates):
            return []
        order = sorted(range(self.num_candidates), key=lambda j: (-self.candidates[j].cumulative_logprob, j))
        ranked: list[RequestOutput] = []
        for rank, j in enumerate(order[: self.params.n]):
            cj = self.candidates[j]
            f = cj.final
            assert f is not None
            ranked.append(
                replace(
                    f,
                    new_token_ids=list(cj.tokens),
                    token_ids=list(cj.tokens),
                    text_delta=f.text,
                    logprobs=list(cj.logprobs) if self.params.logprobs is not None else [],
                    choice_index=rank,
                    cumulative_logprob=cj.cumulative_logprob,
                )
            )
        return ranked

    def ranked_candidates(self) -> list[int]:
        """Candidate indices by cumulative logprob, best first (valid once all finished)."""
        return sorted(range(self.num_candidates), key=lambda j: (-self.candidates[j].cumulative_logprob, j))
