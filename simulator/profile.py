"""Local latency profiles: the file format, measuring the real engine, and a least-squares fit.

File format (JSON, ``format: "pdserve-profile/1"``)::

    {"format": "pdserve-profile/1", "model": "SmolLM2-135M", "device": "cpu", "tp": 1,
     "kv_bytes_per_token": 18432, "block_size": 16, "token_budget": 2048,
     "points": [{"kind": "prefill", "batch": 2, "tokens": 128, "context": 0, "seconds": 0.031},
                {"kind": "decode",  "batch": 8, "tokens": 1,   "context": 256, "seconds": 0.012}]}

A *prefill* point is one engine step in which ``batch`` requests each compute ``tokens`` new
prompt tokens on top of ``context`` tokens already cached; a *decode* point is one step in which
``batch`` requests each decode one token with ``context`` tokens of KV.

The fit uses DistServe's functional forms (see :mod:`simulator.latency.distserve`)::

    prefill = a + b * sum(tokens) + c * sum((context + tokens)^2 - context^2)
    decode  = a + b * sum(context) + c * batch

solved by weighted least squares (weights 1/seconds, i.e. relative error) with non-negative
coefficients (best non-negative subset of features).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

FORMAT = "pdserve-profile/1"


class PointKind(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class ProfilePoint:
    kind: PointKind
    batch: int
    tokens: int
    context: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProfilePoint:
        return cls(
            PointKind(d["kind"]), int(d["batch"]), int(d["tokens"]), int(d["context"]), float(d["seconds"])
        )


@dataclass(frozen=True)
class Profile:
    model: str
    device: str
    points: tuple[ProfilePoint, ...]
    kv_bytes_per_token: int = 0
    tp: int = 1
    block_size: int = 16
    token_budget: int = 2048

    def of_kind(self, kind: PointKind) -> list[ProfilePoint]:
        return [p for p in self.points if p.kind is kind]


def save(profile: Profile, path: str | Path) -> None:
    d = {k: v for k, v in asdict(profile).items() if k != "points"}
    d = {"format": FORMAT, **d, "points": [p.to_json() for p in profile.points]}
    Path(path).write_text(json.dumps(d, indent=1) + "\n")


def load(path: str | Path) -> Profile:
    """The profile written by ``pdserve profile`` at ``path``; ValueError naming the file when it
    is not one (not JSON, another format, a field missing or of the wrong type)."""
    try:
        d = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a {FORMAT} file (not JSON: {e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: not a {FORMAT} file (format={got!r})")
    try:
        return Profile(
            model=d["model"],
            device=d["device"],
            points=tuple(ProfilePoint.from_json(p) for p in d["points"]),
            kv_bytes_per_token=int(d.get("kv_bytes_per_token", 0)),
            tp=int(d.get("tp", 1)),
            block_size=int(d.get("block_size", 16)),
            token_budget=int(d.get("token_budget", 2048)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path}: a {FORMAT} file with a missing or malformed field ({type(e).__name__}: {e})"
        ) from None


# ---------------------------------------------------------------------------- fit
@dataclass(frozen=True)
class ProfileFit:
    """Coefficients in seconds (see the module docstring)."""

    prefill: tuple[float, float, float]
    decode: tuple[float, float, float]

    def prefill_time(self, tokens: Sequence[int], contexts: Sequence[int]) -> float:
        a, b, c = self.prefill
        lin = sum(tokens)
        quad = sum((x + n) ** 2 - x * x for n, x in zip(tokens, contexts, strict=True))
        return a + b * lin + c * quad

    def decode_time(self, batch: int, total_context: int) -> float:
        a, b, c = self.decode
        return a + b * total_context + c * batch

    def predict(self, p: ProfilePoint) -> float:
        if p.kind is PointKind.PREFILL:
            return self.prefill_time([p.tokens] * p.batch, [p.context] * p.batch)
        return self.decode_time(p.batch, p.batch * p.context)


def _features(p: ProfilePoint) -> list[float]:
    if p.kind is PointKind.PREFILL:
        return [1.0, p.batch * p.tokens, p.batch * ((p.context + p.tokens) ** 2 - p.context**2)]
    return [1.0, p.batch * p.context, p.batch]


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weighted (1/y) least squares; the best subset of columns with all coefficients >= 0."""
    w = 1.0 / np.maximum(y, 1e-12)
    xw, yw = x * w[:, None], y * w
    best, best_err = np.zeros(x.shape[1]), np.inf
    cols = range(x.shape[1])
    for k in range(1, x.shape[1] + 1):
        for sub in itertools.combinations(cols, k):
            coef, *_ = np.linalg.lstsq(xw[:, sub], yw, rcond=None)
            if (coef < 0).any():
                continue
            err = float(np.sum((xw[:, sub] @ coef - yw) ** 2))
            if err < best_err:
                best_err = err
                best = np.zeros(x.shape[1])
                best[list(sub)] = coef
    return best


def fit(profile: Profile | Iterable[ProfilePoint]) -> ProfileFit:
    """Fit both phases; a phase with no points gets zero coefficients."""
    pts = list(profile.points if isinstance(profile, Profile) else profile)
    coefs = []
    for kind in (PointKind.PREFILL, PointKind.DECODE):
        sel = [p for p in pts if p.kind is kind]
        if not sel:
            coefs.append((0.0, 0.0, 0.0))
            continue
        x = np.array([_features(p) for p in sel], float)
        y = np.array([p.seconds for p in sel], float)
        coefs.append(tuple(float(v) for v in _nonneg_lstsq(x, y)))
    return ProfileFit(coefs[0], coefs[1])  # type: ignore[arg-type]


@dataclass(frozen=True)
class FitError:
    """Relative errors |pred - measured| / measured on the evaluated points."""

    mean: float
    max: float
    n: int


def fit_error(f: ProfileFit, points: Iterable[ProfilePoint]) -> FitError:
    errs = [abs(f.predict(p) - p.seconds) / p.seconds for p in points if p.seconds > 0]
    if not errs:
        return FitError(0.0, 0.0, 0)
    return FitError(statistics.fmean(errs), max(errs), len(errs))


def holdout_error(profile: Profile, every: int = 4) -> FitError:
    """Fit on all points but every ``every``-th of each kind; report the error on those held out."""
    train: list[ProfilePoint] = []
    test: list[ProfilePoint] = []
    for kind in PointKind:
        for i, p in enumerate(profile.of_kind(kind)):
            (test if i % every == every // 2 else train).append(p)
    return fit_error(fit(train), test)


# ---------------------------------------------------------------------------- measure
class _Engine(Protocol):
    """The part of ``engine.llm_engine.LLMEngine`` measuring needs."""

    def add_request(self, request_id: str | None, prompt: Sequence[int], params: Any) -> str: ...
    def step(self) -> list[Any]: ...
    def has_unfinished(self) -> bool: ...
    def abort(self, request_id: str) -> None: ...


@dataclass(frozen=True)
class ProfileGrid:
    """Points to measure. Prefill contexts > 0 rely on the engine's prefix cache (block aligned)."""

    prefill_tokens: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    prefill_batches: tuple[int, ...] = (1, 2, 4)
    prefill_contexts: tuple[int, ...] = (0, 256)
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    decode_contexts: tuple[int, ...] = (32, 128, 512)
    decode_steps: int = 4  # decode steps timed per point (context reported at their middle)
    repeats: int = 3  # median of this many measurements
    token_budget: int = 2048  # skip prefill points above the engine's per-step budget
    vocab_low: int = 100  # token ids are drawn from [vocab_low, vocab_high), capped at the vocabulary
    vocab_high: int = 5000

    def points(self) -> Iterator[tuple[PointKind, int, int, int]]:
        for t, b, c in itertools.product(self.prefill_tokens, self.prefill_batches, self.prefill_contexts):
            if t * b <= self.token_budget:
                yield PointKind.PREFILL, b, t, c
        for b, c in itertools.product(self.decode_batches, self.decode_contexts):
            yield PointKind.DECODE, b, 1, c


@dataclass
class _Ids:
    rng: random.Random
    lo: int
    hi: int
    n: int = 0
    live: list[str] = field(default_factory=list)

    def tokens(self, k: int) -> list[int]:
        return [self.rng.randrange(self.lo, self.hi) for _ in range(k)]

    def rid(self) -> str:
        self.n += 1
        rid = f"profile-{self.n}"
        self.live.append(rid)
        return rid


def _drain(engine: _Engine, ids: _Ids) -> None:
    for rid in ids.live:
        with contextlib.suppress(KeyError):  # RequestNotFoundError: already finished or released
            engine.abort(rid)
    ids.live.clear()
    while engine.has_unfinished():
        engine.step()


def _time_prefill(
    engine: _Engine,
    ids: _Ids,
    params_factory: Callable[[int], Any],
    b: int,
    t: int,
    c: int,
    timer: Callable[[], float] = time.perf_counter,
) -> float:
    prefix = ids.tokens(c)
    if c:  # warm the prefix cache with the shared context
        engine.add_request(ids.rid(), prefix + ids.tokens(1), params_factory(1))
        while engine.has_unfinished():
            engine.step()
    for _ in range(b):
        engine.add_request(ids.rid(), prefix + ids.tokens(t), params_factory(1))
    t0 = timer()
    engine.step()
    dt = timer() - t0
    _drain(engine, ids)
    return dt


def _time_decode(
    engine: _Engine,
    ids: _Ids,
    params_factory: Callable[[int], Any],
    b: int,
    c: int,
    steps: int,
    timer: Callable[[], float] = time.perf_counter,
) -> float:
    for _ in range(b):
        engine.add_request(ids.rid(), ids.tokens(c), params_factory(steps + 2))
    for _ in range(64):  # run the prefills (and one decode) so every request is decoding
        engine.step()
        if not _has_prefill_pending(engine):
            break
    t0 = timer()
    for _ in range(steps):
        engine.step()
    dt = (timer() - t0) / steps
    _drain(engine, ids)
    return dt


def _has_prefill_pending(engine: Any) -> bool:
    sched = getattr(engine, "scheduler", None)
    if sched is None:
        return False
    return bool(sched.waiting) or any(
        r.num_pending_tokens > 1 or not r.output_token_ids for r in sched.running
    )


def measure_profile(
    engine_factory: Callable[[], _Engine],
    grid: ProfileGrid | None = None,
    progress: bool = True,
    *,
    params_factory: Callable[[int], Any] | None = None,
    model: str = "model",
    device: str = "cpu",
    seed: int = 0,
    timer: Callable[[], float] | None = None,
) -> Profile:
    """Time the real engine on every grid point (median of ``grid.repeats``) and return a Profile.

    ``engine_factory()`` builds one engine (``add_request / step / has_unfinished / abort``), used
    for all points; ``params_factory(max_tokens)`` makes its sampling params (default: greedy
    ``engine.sampling_params.SamplingParams`` with ``ignore_eos``). The engine's ``kv_shape``,
    when present, gives ``kv_bytes_per_token``. ``timer`` reads the clock steps are timed by
    (``time.perf_counter``, wall time, by default; ``time.process_time`` on a shared CPU).
    """
    timer = timer or time.perf_counter
    grid = grid or ProfileGrid()
    if params_factory is None:
        from engine.sampling_params import SamplingParams

        def params_factory(n: int) -> Any:
            return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    engine = engine_factory()
    lo, hi = grid.vocab_low, grid.vocab_high
    vocab = getattr(getattr(engine, "model_config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab < hi:  # small vocabularies: stay inside them
        hi = vocab
        lo = min(lo, hi // 2)
    ids = _Ids(random.Random(seed), lo, hi)
    todo = list(grid.points())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="profile", unit="pt")
    _time_prefill(engine, ids, params_factory, 1, 16, 0)  # warm-up
    points = []
    for kind, b, t, c in todo:
        samples = []
        for _ in range(grid.repeats):
            if kind is PointKind.PREFILL:
                samples.append(_time_prefill(engine, ids, params_factory, b, t, c, timer))
            else:
                samples.append(_time_decode(engine, ids, params_factory, b, c, grid.decode_steps, timer))
        ctx = c if kind is PointKind.PREFILL else c + grid.decode_steps // 2
        points.append(ProfilePoint(kind, b, t, ctx, statistics.median(samples)))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    shape = getattr(engine, "kv_shape", None)
    kvb = int(shape.block_nbytes // shape.block_size) if shape is not None else 0
    cfg = getattr(engine, "config", None)
    return Profile(
        model=model,
        device=device,
        points=tuple(points),
        kv_bytes_per_token=kvb,
        block_size=int(getattr(cfg, "block_size", 16)),
        token_budget=int(getattr(cfg, "max_num_batched_tokens", grid.token_budget)),
    )
