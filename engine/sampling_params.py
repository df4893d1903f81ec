"""Per-request sampling parameters, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    ``temperature == 0`` means greedy. ``top_k <= 0`` disables top-k. ``seed`` makes sampling
    deterministic: the token at output position ``i`` depends only on (seed, i, logits), never on
    which other requests share the batch. ``seed_position_offset`` shifts those positions: a
    request resumed after ``k`` tokens were produced elsewhere passes ``k`` so that its sampling
    continues where the first run stopped. ``logprobs=None`` returns none; ``logprobs=k`` returns
    the sampled token's logprob and the ``k`` most likely alternatives.

    Parallel sampling (``n > 1``, PagedAttention's fork; see :mod:`engine.parallel_sampling`):
    ``best_of`` candidates (default ``n``) are sampled from one prefill and share the prompt's KV
    blocks; candidate ``i`` is sampled with seed ``seed + i`` and is token for token the same
    request run alone with ``n=1`` and that seed. With ``best_of > n`` the ``n`` candidates with
    the highest cumulative logprob are returned (vLLM's legacy ``best_of``). As in vLLM, several
    choices need random sampling: ``temperature == 0`` with ``n > 1`` or ``best_of > 1`` is
    refused (greedy choices would all be identical).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    seed_position_offset: int = 0
    n: int = 1
    best_of: int | None = None

    MAX_LOGPROBS = 20
    MAX_N = 64

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(msg)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be an integer >= 0 (0 or -1 disables it), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (0.0 <= self.min_p <= 1.0):
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.logprobs is not None and not (0 <= self.logprobs <= self.MAX_LOGPROBS):
            bad(f"logprobs must be between 0 and {self.MAX_LOGPROBS}, got {self.logprobs!r}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        if not isinstance(self.seed_position_offset, int) or self.seed_position_offset < 0:
            bad(f"seed_position_offset must be an integer >= 0, got {self.seed_position_offset!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not (1 <= self.n <= self.MAX_N):
            bad(f"n must be an integer in [1, {self.MAX_N}], got {self.n!r}")
        if self.best_of is not None and (
            isinstance(self.best_of, bool)
            or not isinstance(self.best_of, int)
            or not (self.n <= self.best_of <= self.MAX_N)
        ):
            bad(f"best_of must be an integer in [n, {self.MAX_N}] (n={self.n}), got {self.best_of!r}")
        if self.temperature == 0.0 and self.num_candidates > 1:
            bad(
                f"n={self.n}, best_of={self.best_of} with temperature 0 (greedy): every choice would be "
                "identical; use n=1 and best_of=1, or a temperature > 0"
            )
        if self.num_candidates > 1 and self.seed_position_offset:
            bad("seed_position_offset is not supported with n > 1 or best_of > 1 (resume each choice alone)")
        if any(not s for s in self.stop):
            bad("stop strings must be non-empty")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def num_candidates(self) -> int:
        """How many choices are sampled: ``best_of`` when set, else ``n``."""
        return self.n if self.best_of is None else self.best_of

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def greedy_params(cls, max_tokens: int = 16, **kw: object) -> SamplingParams:
        return cls(max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]
