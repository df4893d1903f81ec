"""Latency from DistServe's fitted profiles (OSDI'24 artifact), OPT-13B/66B on A100-80GB.

Reads ``distserve/simdistserve/estimators/profile_data/profiler-a100-80g.<engine>.json``; the
fits are in milliseconds::

    prefill(lens)   = a + b * sum(len) + c * sum(len^2)
    decode(bs, ctx) = a + b * sum(ctx) + c * bs     (small/large-batch coefficients, split at
                                                     ``decoding_large_small_bs_threshold``)

Chunked prefill (a chunk of ``n`` tokens after ``ctx`` cached ones) uses ``b*n + c*((ctx+n)^2 -
ctx^2)`` so that the chunks of a prompt add up to the whole prompt's quadratic term. A mixed step
is the prefill formula plus the decode formula without its intercept (one launch per step).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass

from simulator.data import data_path
from simulator.latency.base import LatencyModel
from simulator.models import ModelSpec, model_spec


class DistServeEngine(enum.Enum):
    DISTSERVE = "distserve"
    VLLM = "vllm"


@dataclass(frozen=True)
class DistServeFit:
    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    threshold: int


def load_fit(model: ModelSpec, tp: int, engine: DistServeEngine = DistServeEngine.DISTSERVE) -> DistServeFit:
    if model.distserve_id is None:
        raise ValueError(f"no DistServe profile for {model.name}")
    path = data_path(
        "distserve", "simdistserve", "estimators", "profile_data", f"profiler-a100-80g.{engine.value}.json"
    )
    with path.open() as f:
        data = json.load(f)
    try:
        p = data[model.distserve_id][str(tp)]
    except KeyError:
        have = sorted(data.get(model.distserve_id, {}), key=int)
        raise ValueError(f"DistServe has no TP{tp} fit for {model.name} (has TP {', '.join(have)})") from None
    return DistServeFit(
        tuple(p["prefill"]),
        tuple(p["decoding_smallbs"]),
        tuple(p["decoding_largebs"]),
        int(p["decoding_large_small_bs_threshold"]),
    )


def available_tps(model: str | ModelSpec, engine: DistServeEngine = DistServeEngine.DISTSERVE) -> list[int]:
    m = model if isinstance(model, ModelSpec) else model_spec(model)
    if m.distserve_id is None:
        return []
    path = data_path(
        "distserve", "simdistserve", "estimators", "profile_data", f"profiler-a100-80g.{engine.value}.json"
    )
    with path.open() as f:
        return sorted(int(k) for k in json.load(f).get(m.distserve_id, {}))


class DistServeLatencyModel(LatencyModel):
    def __init__(
        self,
        model: str | ModelSpec,
        tp: int = 1,
        *,
        engine: DistServeEngine = DistServeEngine.DISTSERVE,
        **kw,
    ) -> None:
        self.model = model if isinstance(model, ModelSpec) else model_spec(model)
        super().__init__(kv_bytes_per_token=self.model.kv_bytes_per_token, **kw)
        self.tp = tp
        self.fit = load_fit(self.model, tp, engine)
        self._p = tuple(x * 1e-3 for x in self.fit.prefill)
        self._ds = tuple(x * 1e-3 for x in self.fit.decode_small)
        self._dl = tuple(x * 1e-3 for x in self.fit.decode_large)

    def step_time(
        self,
        prefill_tokens: Sequence[int],
        prefill_contexts: Sequence[int],
        num_decodes: int,
        decode_context: int,
    ) -> float:
        t = 0.0
        if prefill_tokens:
            a, b, c = self._p
            lin = quad = 0
            for n, ctx in zip(prefill_tokens, prefill_contexts, strict=True):
                lin += n
                e = ctx + n
                quad += e * e - ctx * ctx
            t = a + b * lin + c * quad
        if num_decodes:
            a, b, c = self._ds if num_decodes < self.fit.threshold else self._dl
            t += b * decode_context + c * num_decodes + (0.0 if prefill_tokens else a)
        return t
