"""Fitting a worker's step-time model from measured engine steps (pure: no I/O, no torch).

The model is the router's linear latency model (``router.policy.latency.LinearLatency``)::

    prefill(tokens)        = prefill_base_s + prefill_per_token_s * tokens
    decode(batch, context) = decode_base_s + decode_per_seq_s * batch + decode_per_ctx_token_s * context

(``context``: the batch's total KV tokens). :func:`fit_step_model` fits it by least squares to
:class:`PrefillSample` / :class:`DecodeSample` measurements; a coefficient that would come out
negative (noise on a flat term) is dropped to 0 and the rest refitted, so every prediction is
non-negative and monotone in its inputs. The prefill-with-cached-context term is not measured
(0): the router's online correction absorbs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PrefillSample:
    """One prefill step of ``tokens`` new prompt tokens (no cached context) took ``seconds``."""

    tokens: int
    seconds: float


@dataclass(frozen=True)
class DecodeSample:
    """One decode step of ``batch`` sequences holding ``context`` KV tokens in all took ``seconds``."""

    batch: int
    context: int
    seconds: float


@dataclass(frozen=True)
class StepModel:
    """Fitted coefficients (seconds; the names of ``LinearLatency``'s fields)."""

    prefill_base_s: float
    prefill_per_token_s: float
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_ctx_token_s: float
    prefill_per_token_ctx_s: float = 0.0

    def __post_init__(self) -> None:
        if any(v < 0 or v != v for v in asdict(self).values()):
            raise ValueError(f"step model coefficients must be finite and >= 0: {self}")

    def prefill_time(self, tokens: int) -> float:
        return self.prefill_base_s + self.prefill_per_token_s * tokens

    def decode_time(self, batch: int, context: int) -> float:
        return self.decode_base_s + self.decode_per_seq_s * batch + self.decode_per_ctx_token_s * context

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StepModel:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ``ValueError``."""
        names = set(cls.__dataclass_fields__)
        extra = set(d) - names
        if extra:
            raise ValueError(f"unknown step model keys: {sorted(extra)}")
        try:
            return cls(**{k: float(v) for k, v in d.items()})
        except TypeError as e:
            raise ValueError(f"incomplete step model {d!r}: {e}") from None


def _nnls(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Least squares ``rows @ x ~ ys`` with ``x >= 0``: solve, drop negative coefficients to 0
    (refitting the others) until none is negative. Tiny systems: normal equations by Gaussian
    elimination (a singular column set drops the column)."""
    k = len(rows[0])
    active = list(range(k))
    while True:
        x = _lstsq([[r[j] for j in active] for r in rows], ys)
        full = [0.0] * k
        for j, v in zip(active, x, strict=True):
            full[j] = v
        neg = [j for j, v in zip(active, x, strict=True) if v < 0]
        if not neg:
            return full
        worst = min(neg, key=lambda j: full[j])
        active.remove(worst)
        if not active:
            return [0.0] * k


def _lstsq(rows: list[list[float]], ys: Sequence[float]) -> list[float]:
    k = len(rows[0]) if rows else 0
    if k == 0:
        return []
    a = [[sum(r[i] * r[j] for r in rows) for j in range(k)] for i in range(k)]
    b = [sum(r[i] * y for r, y in zip(rows, ys, strict=True)) for i in range(k)]
    for col in range(k):
        piv = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) < 1e-30:
            return [0.0 if j == col else v for j, v in enumerate(_lstsq_without(rows, ys, col))]
        a[col], a[piv] = a[piv], a[col]
        b[col], b[piv] = b[piv], b[col]
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
                b[r] -= f * b[col]
    return [b[i] / a[i][i] for i in range(k)]


def _lstsq_without(rows: list[list[float]], ys: Sequence[float], col: int) -> list[float]:
    """:func:`_lstsq` without column ``col`` (0 in its place)."""
    x = _lstsq([[v for j, v in enumerate(r) if j != col] for r in rows], ys)
    x.insert(col, 0.0)
    return x


def fit_step_model(prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample]) -> StepModel:
    """The non-negative least-squares :class:`StepModel` of the samples.

    Needs prefill samples at >= 2 distinct token counts and decode samples at >= 2 distinct batch
    sizes (``ValueError`` otherwise: a model that cannot tell a slope from a base is not fitted)."""
    if len({s.tokens for s in prefill}) < 2:
        raise ValueError("need prefill samples at two or more token counts")
    if len({s.batch for s in decode}) < 2:
        raise ValueError("need decode samples at two or more batch sizes")
    bad = [s for s in (*prefill, *decode) if not (s.seconds > 0 and s.seconds < float("inf"))]
    if bad:
        raise ValueError(f"step times must be positive and finite: {bad[:3]}")
    p0, p1 = _nnls([[1.0, float(s.tokens)] for s in prefill], [s.seconds for s in prefill])
    d0, d1, d2 = _nnls([[1.0, float(s.batch), float(s.context)] for s in decode], [s.seconds for s in decode])
    return StepModel(
        prefill_base_s=p0,
        prefill_per_token_s=p1,
        decode_base_s=d0,
        decode_per_seq_s=d1,
        decode_per_ctx_token_s=d2,
    )
