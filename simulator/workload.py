"""Workloads: request arrival times and lengths (trace replays and synthetic generators).

Sources: the Mooncake conversation trace (JSONL: ``timestamp`` ms, ``input_length``,
``output_length``, ``hash_ids`` of 512-token prefix blocks), the Azure LLM 2023 code trace (CSV:
``TIMESTAMP, ContextTokens, GeneratedTokens``), and synthetic Poisson / Gamma arrivals with
lognormal, uniform or fixed lengths. :meth:`Workload.with_rate` rescales arrival times to a mean
rate (the shape of the arrival process is kept), which is how goodput searches sweep load.
"""

from __future__ import annotations

import csv
import enum
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from pdserve.errors import InvalidRequestError
from simulator.data import data_path

MOONCAKE_BLOCK = 512


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """One request: arrival (s from the start), prompt and output lengths, optional prefix ids,
    the LoRA adapter it names.

    ``hash_ids[i]`` names prompt tokens ``[i*hash_block, (i+1)*hash_block)``; equal ids at equal
    positions mean equal prefixes (Mooncake's remapped prefix hashes).
    """

    arrival_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] | None = None
    hash_block: int = MOONCAKE_BLOCK
    adapter: str = ""  # the LoRA adapter it names ("": the base model; simulator.adapters)


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[WorkloadRequest, ...]

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        if len(self.requests) < 2:
            return 0.0
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    @property
    def rate(self) -> float:
        """Mean arrival rate (requests/s) over the trace."""
        d = self.duration_s
        return (len(self.requests) - 1) / d if d > 0 else math.inf

    def head(self, n: int) -> Workload:
        return Workload(self.name, self.requests[:n])

    def scaled(self, factor: float) -> Workload:
        """Arrival rate multiplied by ``factor`` (times divided by it; the first arrival stays at 0)."""
        if factor <= 0:
            raise ValueError("rate factor must be > 0")
        t0 = self.requests[0].arrival_s if self.requests else 0.0
        reqs = tuple(replace(r, arrival_s=(r.arrival_s - t0) / factor) for r in self.requests)
        return Workload(self.name, reqs)

    def with_rate(self, rate: float) -> Workload:
        """The same requests arriving at mean ``rate`` requests/s."""
        return self.scaled(rate / self.rate)

    def clipped(self, max_input: int | None = None, max_total: int | None = None) -> Workload:
        """Truncate prompts to ``max_input`` and outputs so that input + output <= ``max_total``."""
        out = []
        for r in self.requests:
            i = min(r.input_len, max_input) if max_input else r.input_len
            o = r.output_len
            if max_total:
                i = min(i, max_total - 1)
                o = max(1, min(o, max_total - i))
            if (i, o) != (r.input_len, r.output_len):
                ids = r.hash_ids[: -(-i // r.hash_block)] if r.hash_ids is not None else None
                r = replace(r, input_len=i, output_len=o, hash_ids=ids)
            out.append(r)
        return Workload(self.name, tuple(out))

    def mean_lengths(self) -> tuple[float, float]:
        if not self.requests:
            return (0.0, 0.0)
        n = len(self.requests)
        return (sum(r.input_len for r in self.requests) / n, sum(r.output_len for r in self.requests) / n)


# ---------------------------------------------------------------------------- traces
def load_mooncake(path: str | Path | None = None, limit: int | None = None) -> Workload:
    """The Mooncake conversation trace (or another file in its JSONL format)."""
    p = Path(path) if path else data_path("mooncake", "conversation_trace.jsonl")
    reqs = []
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(reqs) >= limit:
                break
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                reqs.append(
                    WorkloadRequest(
                        d["timestamp"] / 1000.0,
                        int(d["input_length"]),
                        max(1, int(d["output_length"])),
                        tuple(d["hash_ids"]),
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                raise InvalidRequestError(
                    f"trace {p}, line {lineno}: not a Mooncake-format request ({type(e).__name__}: {e}); "
                    'each line is {"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [...]}'
                ) from None
    return _nonempty(p, Workload(p.stem, tuple(sorted(reqs, key=lambda r: r.arrival_s))))


def _nonempty(p: Path, w: Workload) -> Workload:
    if not w.requests:
        raise InvalidRequestError(f"trace {p} holds no requests")
    return w


def _parse_ts(s: str) -> float:
    day, _, frac = s.strip().partition(".")
    base = datetime.strptime(day, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def load_azure(path: str | Path | None = None, limit: int | None = None) -> Workload:
    """The Azure LLM inference 2023 trace (code by default; the conversation CSV has the same columns)."""
    p = Path(path) if path else data_path("azure_llm_2023", "AzureLLMInferenceTrace_code.csv")
    rows = []
    with p.open(newline="") as f:
        for lineno, row in enumerate(csv.DictReader(f), 2):
            if limit is not None and len(rows) >= limit:
                break
            try:
                rows.append(
                    (_parse_ts(row["TIMESTAMP"]), int(row["ContextTokens"]), int(row["GeneratedTokens"]))
                )
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise InvalidRequestError(
                    f"trace {p}, line {lineno}: not an Azure-format request ({type(e).__name__}: {e}); "
                    "the CSV needs the columns TIMESTAMP (YYYY-MM-DD HH:MM:SS[.frac]), ContextTokens, "
                    "GeneratedTokens"
                ) from None
    rows.sort()
    t0 = rows[0][0] if rows else 0.0
    w = Workload(p.stem, tuple(WorkloadRequest(t - t0, max(1, i), max(1, o)) for t, i, o in rows))
    return _nonempty(p, w)


# ---------------------------------------------------------------------------- synthetic
class LengthKind(enum.Enum):
    FIXED = "fixed"
    UNIFORM = "uniform"
    LOGNORMAL = "lognormal"


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths: FIXED(``a``), UNIFORM[``a``, ``b``], LOGNORMAL(median ``a``, sigma ``b``); clipped to [lo, hi]."""

    kind: LengthKind
    a: float
    b: float = 0.0
    lo: int = 1
    hi: int = 1 << 30

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind is LengthKind.FIXED:
            x = np.full(n, self.a)
        elif self.kind is LengthKind.UNIFORM:
            x = rng.integers(int(self.a), int(self.b) + 1, n)
        else:
            x = rng.lognormal(math.log(self.a), self.b, n)
        return np.clip(np.rint(x), self.lo, self.hi).astype(np.int64)

    @property
    def mean(self) -> float:
        """Mean before clipping."""
        if self.kind is LengthKind.FIXED:
            return self.a
        if self.kind is LengthKind.UNIFORM:
            return (self.a + self.b) / 2
        return self.a * math.exp(self.b**2 / 2)


# ShareGPT-like chatbot lengths. Assumption (we do not ship ShareGPT): lognormal shapes whose
# means approximate DistServe's ShareGPT chatbot set under the OPT tokenizer (prompts carry the
# conversation so far: mean ~700 tokens; outputs mean ~200), clipped so that prompt + output
# fit OPT's 2048-token context. Measured means of `sharegpt(10000)`: input 688, output 185.
SHAREGPT_INPUT = LengthDistribution(LengthKind.LOGNORMAL, 520, 0.9, lo=4, hi=1800)
SHAREGPT_OUTPUT = LengthDistribution(LengthKind.LOGNORMAL, 130, 0.9, lo=2, hi=1024)
SHAREGPT_CONTEXT = 2048


class ArrivalKind(enum.Enum):
    POISSON = "poisson"
    GAMMA = "gamma"  # burstiness by the coefficient of variation ``cv`` (cv = 1: Poisson)
    UNIFORM = "uniform"  # fixed inter-arrival time


@dataclass(frozen=True)
class ArrivalProcess:
    kind: ArrivalKind = ArrivalKind.POISSON
    cv: float = 1.0

    def times(self, rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        if self.kind is ArrivalKind.UNIFORM:
            gaps = np.full(n, 1.0 / rate)
        elif self.kind is ArrivalKind.POISSON or self.cv == 1.0:
            gaps = rng.exponential(1.0 / rate, n)
        else:
            shape = 1.0 / (self.cv**2)
            gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
        gaps[0] = 0.0
        return np.cumsum(gaps)


def synthetic(
    n: int,
    rate: float,
    input_len: LengthDistribution = SHAREGPT_INPUT,
    output_len: LengthDistribution = SHAREGPT_OUTPUT,
    arrival: ArrivalProcess | None = None,
    seed: int = 0,
    name: str = "synthetic",
) -> Workload:
    """``n`` requests at mean ``rate``/s; lengths and arrivals drawn from one seeded generator."""
    rng = np.random.default_rng(seed)
    ins = input_len.sample(rng, n)
    outs = output_len.sample(rng, n)
    ts = (arrival or ArrivalProcess()).times(rng, n, rate)
    return Workload(
        name, tuple(WorkloadRequest(float(t), int(i), int(o)) for t, i, o in zip(ts, ins, outs, strict=True))
    )


def sharegpt(n: int, rate: float = 1.0, seed: int = 0, arrival: ArrivalProcess | None = None) -> Workload:
    """ShareGPT-like chatbot requests (see ``SHAREGPT_INPUT``), fitting a 2048-token context."""
    w = synthetic(n, rate, SHAREGPT_INPUT, SHAREGPT_OUTPUT, arrival, seed, name="sharegpt-like")
    return w.clipped(max_total=SHAREGPT_CONTEXT)


def from_lengths(
    lengths: Iterable[tuple[int, int]], rate: float, seed: int = 0, name: str = "lengths"
) -> Workload:
    """Poisson arrivals for the given (input, output) pairs."""
    pairs: Sequence[tuple[int, int]] = list(lengths)
    ts = ArrivalProcess().times(np.random.default_rng(seed), len(pairs), rate)
    return Workload(name, tuple(WorkloadRequest(float(t), i, o) for t, (i, o) in zip(ts, pairs, strict=True)))


# ---------------------------------------------------------------------------- by name
WORKLOAD_NAMES = ("sharegpt", "mooncake", "azure-code")


def named_workload(spec: str, n: int | None = None, rate: float | None = None, seed: int = 0) -> Workload:
    """``sharegpt`` (synthetic), ``mooncake``, ``azure-code``, or a path to a .jsonl / .csv trace.

    ``n`` limits (or, for synthetic, sets) the request count; ``rate`` rescales to that mean rate.
    """
    if spec == "sharegpt":
        w = sharegpt(n or 1000, rate or 1.0, seed)
    elif spec == "mooncake":
        w = load_mooncake(limit=n)
    elif spec == "azure-code":
        w = load_azure(limit=n)
    elif spec.endswith(".jsonl"):
        w = load_mooncake(spec, limit=n)
    elif spec.endswith(".csv"):
        w = load_azure(spec, limit=n)
    else:
        raise InvalidRequestError(
            f"unknown workload {spec!r}: use one of {', '.join(WORKLOAD_NAMES)} or a .jsonl/.csv path"
        )
    return w.with_rate(rate) if rate and spec != "sharegpt" else w


# ---------------------------------------------------------------------------- sources at a rate
@dataclass(frozen=True)
class RateSource:
    """Workloads at any mean rate for goodput searches, long enough to reach steady state.

    At rate ``r`` the workload holds ``clamp(r * duration_s, min_requests, max_requests)``
    requests. Synthetic sources draw them afresh (same seed); trace sources rescale the trace
    and, when more requests are needed than it has, repeat it back to back (prefix ids of each
    repetition are offset so that repetitions do not share cache).
    """

    base: Workload | None = None  # trace to replay (None: synthetic)
    input_len: LengthDistribution = SHAREGPT_INPUT
    output_len: LengthDistribution = SHAREGPT_OUTPUT
    arrival: ArrivalProcess = ArrivalProcess()
    max_total: int | None = SHAREGPT_CONTEXT
    duration_s: float = 60.0
    min_requests: int = 200
    max_requests: int = 20000
    seed: int = 0
    name: str = "sharegpt-like"

    def count(self, rate: float) -> int:
        return int(min(self.max_requests, max(self.min_requests, math.ceil(rate * self.duration_s))))

    def at_rate(self, rate: float) -> Workload:
        n = self.count(rate)
        if self.base is None:
            w = synthetic(n, rate, self.input_len, self.output_len, self.arrival, self.seed, self.name)
            return w.clipped(max_total=self.max_total) if self.max_total else w
        base = self.base.with_rate(rate)
        reqs = list(base.requests[:n])
        rep = 1
        span = base.duration_s + 1.0 / rate
        off_ids = 1 + max((max(r.hash_ids) for r in base.requests if r.hash_ids), default=0)
        while len(reqs) < n and base.requests:
            for r in base.requests[: n - len(reqs)]:
                ids = tuple(h + rep * off_ids for h in r.hash_ids) if r.hash_ids is not None else None
                reqs.append(replace(r, arrival_s=r.arrival_s + rep * span, hash_ids=ids))
            rep += 1
        return Workload(base.name, tuple(reqs))


def sharegpt_source(duration_s: float = 60.0, seed: int = 0, **kw) -> RateSource:
    return RateSource(duration_s=duration_s, seed=seed, **kw)
