"""What the engine hands back each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import FinishReason


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        t = self.token_times
        return None if len(t) < 2 else (t[-1] - t[0]) / (len(t) - 1)


@dataclass
class RequestOutput:
    """Delta for one request after one engine step (``token_ids``/``text`` are cumulative).

    ``choice_index``: which of a parallel-sampling request's choices this is (``SamplingParams.n
    > 1``; 0 otherwise): the outputs of all its choices carry the request's id, each its own
    index in ``[0, n)``. ``cumulative_logprob``: sum of the sampled tokens' logprobs so far (raw
    model distribution), when the request asked for logprobs (always set for ``best_of > n``).
    """

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]
    text_delta: str
    text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    metrics: RequestMetrics | None = None
    stop_reason: int | str | None = None
    choice_index: int = 0
    cumulative_logprob: float | None = None
