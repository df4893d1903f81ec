"""Open-loop load generator against a running pdserve cluster (``pdserve bench``).

Workloads come from :mod:`simulator.workload` (Mooncake JSONL, Azure CSV, synthetic Poisson/Gamma),
scaled to this machine: lengths divided by ``length_scale`` and clipped, arrival rate set by
``rate``. Mooncake ``hash_ids`` become real shared token prefixes: each id maps to a fixed
pseudo-random block of ``512 / length_scale`` token ids, so requests that share ids in the trace
share prompt prefixes here and exercise the prefix caches.

Requests are sent at their arrival times regardless of completions (open loop), each on its own
asyncio task. Results record TTFT, TPOT (mean inter-token time), e2e, outcome (ok, rejected =
RESOURCE_EXHAUSTED, error) and cached prompt tokens.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from pdserve.errors import PdserveError, ResourceExhaustedError
from simulator.workload import Workload


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class LoadRequest:
    arrival_s: float
    prompt: tuple[int, ...]
    max_tokens: int


@dataclass
class LoadResult:
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    outcome: str = "ok"  # ok | rejected | error
    error: str = ""
    ttft_s: float = math.nan
    tpot_s: float = math.nan
    e2e_s: float = math.nan
    output_tokens: int = 0
    cached_tokens: int = 0
    reject_reason: str = ""  # a RejectKind value when rejected
    retry_after_s: float = math.nan  # the router's retry-after hint of a rejection (nan: none)

    def meets(self, slo: SLO) -> bool:
        if self.outcome != "ok":
            return False
        tpot_ok = self.output_tokens < 2 or self.tpot_s <= slo.tpot_s
        return self.ttft_s <= slo.ttft_s and tpot_ok


def materialize(
    w: Workload,
    length_scale: int,
    vocab: int,
    max_input: int,
    max_output: int,
    seed: int = 0,
) -> list[LoadRequest]:
    """Turn a workload into token-level requests (see module doc for hash_ids -> prefixes)."""
    rng = np.random.default_rng(seed)
    blocks: dict[int, tuple[int, ...]] = {}
    out: list[LoadRequest] = []
    for r in w.requests:
        n_in = max(1, min(max_input, r.input_len // length_scale))
        n_out = max(1, min(max_output, r.output_len // length_scale))
        if r.hash_ids:
            bt = max(1, r.hash_block // length_scale)
            toks: list[int] = []
            for h in r.hash_ids:
                b = blocks.get(h)
                if b is None:
                    b = tuple(int(x) for x in np.random.default_rng(h + 1).integers(100, vocab, bt))
                    blocks[h] = b
                toks.extend(b)
            prompt = (
                tuple(toks[:n_in])
                if len(toks) >= n_in
                else tuple(toks) + tuple(int(x) for x in rng.integers(100, vocab, n_in - len(toks)))
            )
        else:
            prompt = tuple(int(x) for x in rng.integers(100, vocab, n_in))
        out.append(LoadRequest(r.arrival_s, prompt, n_out))
    return out


class RejectKind(enum.Enum):
    """Why the router refused a request, from its message (``router.policy.goodput`` wording)."""

    TTFT = "predicted TTFT over SLO"
    TPOT = "predicted TPOT over SLO"
    KV_FULL = "no free KV blocks"
    PAIR = "no (prefill, decode) pair meets both"
    QUOTA = "tenant quota"
    OTHER = "other"


_REJECT_MARKERS = (
    ("predicted TTFT", RejectKind.TTFT),
    ("predicted TPOT", RejectKind.TPOT),
    ("free KV blocks", RejectKind.KV_FULL),
    ("no single (prefill, decode) pair", RejectKind.PAIR),
    ("requests in flight (quota", RejectKind.QUOTA),
)


def classify_rejection(message: str) -> RejectKind:
    """The :class:`RejectKind` a rejection message states (OTHER: none of the known wordings)."""
    for marker, kind in _REJECT_MARKERS:
        if marker in message:
            return kind
    return RejectKind.OTHER


async def _one(client, req: LoadRequest, t0: float, slo: SLO | None, res: LoadResult) -> None:
    from engine.sampling_params import SamplingParams

    delay = t0 + req.arrival_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    start = time.monotonic()
    first = None
    times: list[float] = []
    try:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
        kw = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s} if slo else {}
        async for ch in client.generate(list(req.prompt), params, **kw):
            now = time.monotonic()
            if ch.token_ids:
                times.extend([now] * len(ch.token_ids))
                if first is None:
                    first = now
            if ch.finish is not None:
                res.cached_tokens = ch.finish.cached_prompt_tokens
    except ResourceExhaustedError as e:
        res.outcome, res.error = "rejected", str(e)
        res.reject_reason = classify_rejection(str(e)).value
        if e.retry_after_s is not None:
            res.retry_after_s = float(e.retry_after_s)
        return
    except PdserveError as e:
        res.outcome, res.error = "error", f"{type(e).__name__}: {e}"
        return
    end = time.monotonic()
    res.output_tokens = len(times)
    res.ttft_s = (first - start) if first is not None else math.nan
    res.e2e_s = end - start
    if len(times) >= 2:
        res.tpot_s = (times[-1] - times[0]) / (len(times) - 1)


async def replay_async(
    address: str,
    reqs: Sequence[LoadRequest],
    slo: SLO | None = None,
    progress: bool = True,
    timeout_s: float = 600.0,
) -> list[LoadResult]:
    from pdserve.client import AsyncClient

    results = [LoadResult(r.arrival_s, len(r.prompt), r.max_tokens) for r in reqs]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(reqs), desc="replay", unit="req")
    async with AsyncClient(address, timeout=timeout_s) as client:
        t0 = time.monotonic()

        async def run(i: int) -> None:
            await _one(client, reqs[i], t0, slo, results[i])
            if bar:
                bar.update(1)

        await asyncio.gather(*(run(i) for i in range(len(reqs))))
    if bar:
        bar.close()
    return results


def replay(
    address: str, reqs: Sequence[LoadRequest], slo: SLO | None = None, progress: bool = True
) -> list[LoadResult]:
    return asyncio.run(replay_async(address, reqs, slo, progress))


# ----------------------------------------------------------------------------------- report
ERROR_CHARS = 300  # of a failed request's error kept in the report (the rest is detail)


def _pct(xs: list[float], q: float) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.percentile(xs, q)) if xs else math.nan


def _mean(xs: list[float]) -> float:
    """Mean of the defined values of ``xs`` (NaN: a latency the request does not have, such as
    the TPOT of a one-token output); NaN when none is defined, without numpy's empty-slice
    warning."""
    xs = [x for x in xs if not math.isnan(x)]
    return math.fsum(xs) / len(xs) if xs else math.nan


@dataclass
class Report:
    n: int
    rate: float
    ok: int
    rejected: int
    errors: int
    attainment: float  # share of ALL requests meeting both SLOs
    attainment_admitted: float  # share of admitted (not rejected) requests meeting both SLOs
    goodput_rps: float  # requests/s meeting both SLOs over the replay span
    prefix_hit_rate: float  # cached prompt tokens / prompt tokens of ok requests
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    reject_reasons: dict[str, int] = field(default_factory=dict)  # RejectKind value -> count
    retry_after_s: dict[str, float] = field(default_factory=dict)  # p50/max of rejections' hints
    error_messages: dict[str, int] = field(default_factory=dict)  # a failed request's error -> count

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(results: Sequence[LoadResult], slo: SLO, rate: float) -> Report:
    ok = [r for r in results if r.outcome == "ok"]
    admitted = [r for r in results if r.outcome != "rejected"]
    met = [r for r in results if r.meets(slo)]
    span = max((r.arrival_s + (r.e2e_s if not math.isnan(r.e2e_s) else 0)) for r in results) if results else 0
    lat = {}
    for name in ("ttft_s", "tpot_s", "e2e_s"):
        xs = [getattr(r, name) for r in ok]
        lat[name] = {
            "p50": _pct(xs, 50),
            "p90": _pct(xs, 90),
            "p99": _pct(xs, 99),
            "mean": _mean(xs),
        }
    ptoks = sum(r.prompt_tokens for r in ok)
    rejected = [r for r in results if r.outcome == "rejected"]
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r.reject_reason or RejectKind.OTHER.value] = (
            reasons.get(r.reject_reason or RejectKind.OTHER.value, 0) + 1
        )
    hints = [r.retry_after_s for r in rejected]
    return Report(
        n=len(results),
        rate=rate,
        ok=len(ok),
        rejected=sum(r.outcome == "rejected" for r in results),
        errors=sum(r.outcome == "error" for r in results),
        attainment=len(met) / len(results) if results else 0.0,
        attainment_admitted=len(met) / len(admitted) if admitted else 0.0,
        goodput_rps=len(met) / span if span > 0 else 0.0,
        prefix_hit_rate=sum(r.cached_tokens for r in ok) / ptoks if ptoks else 0.0,
        latency=lat,
        reject_reasons=reasons,
        retry_after_s={"p50": _pct(hints, 50), "max": _pct(hints, 100)} if rejected else {},
        error_messages=dict(Counter(r.error[:ERROR_CHARS] for r in results if r.outcome == "error")),
    )


def goodput_from_sweep(reports: Sequence[Report], target: float) -> float:
    """Largest swept rate whose attainment reaches ``target`` (linear interpolation to the crossing)."""
    pts = sorted((r.rate, r.attainment) for r in reports)
    best = 0.0
    for (r0, a0), (r1, a1) in zip(pts, pts[1:], strict=False):
        if a0 >= target:
            best = r0
            if a1 < target:
                return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
    if pts and pts[-1][1] >= target:
        best = pts[-1][0]
    return best


def format_report(rep: Report) -> str:
    L = rep.latency
    return (
        f"rate {rep.rate:.2f} req/s  n={rep.n} ok={rep.ok} rejected={rep.rejected} errors={rep.errors}\n"
        f"  TTFT p50/p90/p99 {L['ttft_s']['p50']:.3f}/{L['ttft_s']['p90']:.3f}/{L['ttft_s']['p99']:.3f} s   "
        f"TPOT p50/p90/p99 {L['tpot_s']['p50'] * 1e3:.1f}/{L['tpot_s']['p90'] * 1e3:.1f}/{L['tpot_s']['p99'] * 1e3:.1f} ms   "
        f"e2e p50/p99 {L['e2e_s']['p50']:.2f}/{L['e2e_s']['p99']:.2f} s\n"
        f"  SLO attainment {rep.attainment:.1%} of all requests (a rejected one counts as a miss), "
        f"{rep.attainment_admitted:.1%} of the {rep.n - rep.rejected} admitted  "
        f"goodput {rep.goodput_rps:.2f} req/s  prefix hit {rep.prefix_hit_rate:.1%}"
        + format_rejections(rep)
        + format_errors(rep)
    )


def format_errors(rep: Report, most: int = 3) -> str:
    """The failed requests' errors, the ``most`` commonest with their counts ('' when none
    failed): a sweep whose requests all failed says why, not only how many."""
    if not rep.errors:
        return ""
    common = sorted(rep.error_messages.items(), key=lambda kv: -kv[1])[:most]
    lines = "".join(f"\n    {n} x {msg}" for msg, n in common)
    more = len(rep.error_messages) - len(common)
    return f"\n  failed {rep.errors}/{rep.n}:" + lines + (f"\n    ({more} other errors)" if more > 0 else "")


def format_rejections(rep: Report) -> str:
    """The rejection line of :func:`format_report` ('' when nothing was rejected)."""
    if not rep.rejected:
        return ""
    why = ", ".join(f"{n} {k}" for k, n in sorted(rep.reject_reasons.items(), key=lambda kv: -kv[1]))
    ra = rep.retry_after_s
    hint = (
        f"; retry-after p50 {ra['p50']:.2f} s, max {ra['max']:.2f} s"
        if ra and not math.isnan(ra.get("p50", math.nan))
        else "; no retry-after given"
    )
    return f"\n  rejected {rep.rejected}/{rep.n} before any compute ({why}){hint}"


def plot(
    reports: Sequence[Report], results: Sequence[Sequence[LoadResult]], out_png_prefix: str
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rates = [r.rate for r in reports]
    ax.plot(rates, [r.attainment for r in reports], "o-", label="attainment, all requests")
    ax.plot(rates, [r.attainment_admitted for r in reports], "s--", label="attainment, admitted")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    gx = ax.twinx()  # goodput: requests/s meeting both SLOs (what placement is for)
    gx.plot(rates, [r.goodput_rps for r in reports], "^:", color="tab:green", label="goodput (req/s)")
    gx.plot(rates, rates, color="0.6", lw=0.8, label="offered rate")
    gx.set_ylabel("goodput (req/s)")
    gx.set_ylim(0, max(rates) * 1.1 if rates else 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = gx.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    fig.tight_layout()
    p = f"{out_png_prefix}_attainment.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for rep, res in zip(reports, results, strict=True):
        for ax, key in zip(axes, ("ttft_s", "tpot_s"), strict=True):
            xs = np.sort(
                [getattr(r, key) for r in res if r.outcome == "ok" and not math.isnan(getattr(r, key))]
            )
            if len(xs):
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=f"{rep.rate:.2f} req/s")
    for ax, key in zip(axes, ("TTFT (s)", "TPOT (s)"), strict=True):
        ax.set_xlabel(key)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no request finished: no curve to name
            ax.legend(fontsize=7)
    fig.tight_layout()
    p = f"{out_png_prefix}_cdf.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths
