"""The SDK's side of parallel sampling (``n > 1`` / ``best_of``): chunks carry a
``choice_index``; :class:`ChoicesResume` resumes each choice on its own when a router goes away;
:func:`group_completions` turns a stream into one :class:`~pdserve.client.Completion` per
choice. Pure (no gRPC)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pdserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from pdserve.client import Chunk, Completion, Finish, Resume


def num_choices(n: int) -> int:
    """Choices a request's stream holds (its ``SamplingParams.n``; proto 0 means 1)."""
    return n or 1


def requested_n(params: object, kw: dict) -> int:
    """``n`` of a ``generate``/``complete`` call: ``params.n`` when a SamplingParams is given,
    else the ``n=`` keyword (1 when absent); the call's other keywords (timeout, metadata, ...)
    are not looked at."""
    if params is not None:
        return int(getattr(params, "n", 1))
    n = kw.get("n", 1)
    return n if isinstance(n, int) and n > 0 else 1


class ChoicesResume:
    """:class:`pdserve.client.Resume` for a stream of several choices: one per choice, each
    trimmed by what the caller has of that choice (choices interleave in any order, and a
    re-issued stream may interleave them differently)."""

    def __init__(self, n: int) -> None:
        from pdserve.client import Resume

        self._by: list[Resume] = [Resume() for _ in range(n)]
        self.request_id = ""

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self._by)

    @property
    def delivered(self) -> bool:
        return any(r.delivered for r in self._by)

    @property
    def finished(self) -> bool:
        """Every choice has its finish."""
        return all(r.finished for r in self._by)

    def restart(self) -> None:
        for r in self._by:
            r.restart()

    def trim(self, c: Chunk) -> Chunk | None:
        if not 0 <= c.choice_index < len(self._by):
            raise InvalidRequestError(
                f"chunk for choice {c.choice_index} of a request with n={len(self._by)}"
            )
        r = self._by[c.choice_index]
        r.request_id = r.request_id or self.request_id
        out = r.trim(c)
        self.request_id = self.request_id or r.request_id
        return out


def group_completions(chunks: Iterable[Chunk], n: int) -> list[Completion]:
    """The ``n`` choices of a stream, whole, by ``choice_index`` (each with its own finish: its
    usage counts its own completion tokens). Raises RuntimeError when the stream ended before
    every choice finished."""
    from pdserve.client import Completion

    ids: list[list[int]] = [[] for _ in range(n)]
    text: list[list[str]] = [[] for _ in range(n)]
    fin: list[Finish | None] = [None] * n
    rid = ""
    for c in chunks:
        rid = rid or c.request_id
        ids[c.choice_index] += c.token_ids
        text[c.choice_index].append(c.text)
        fin[c.choice_index] = c.finish or fin[c.choice_index]
    missing = [i for i, f in enumerate(fin) if f is None]
    if missing:
        raise RuntimeError(f"stream ended before choices {missing} finished")
    return [Completion(rid, ids[i], "".join(text[i]), fin[i]) for i in range(n)]  # type: ignore[arg-type]


def refuse_several(n: int, what: str) -> None:
    """``complete`` returns one completion: a request with ``n > 1`` is refused (naming
    ``complete_choices``) rather than its choices' tokens run together."""
    if n > 1:
        raise InvalidRequestError(f"n={n}: {what} returns one completion; use complete_choices for n > 1")
