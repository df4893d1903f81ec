"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, logprobs.

Determinism contract: a request's token at output index ``i`` is a function of its logits row,
its parameters, its seed and ``i`` only. Each sampled request draws its noise from its own
``torch.Generator`` seeded with ``mix(seed, i)``, so batch composition, preemption/recompute and
prefill/decode disaggregation never change the result. Requests without a user seed get a random
seed at admission (kept on the request), so they too are reproducible internally.

Sampling uses the exponential-race form: ``argmax(p / E)`` with ``E ~ Exp(1)`` draws from ``p``.
Logprobs are of the model's raw distribution (log-softmax of unprocessed logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.argmax_native import argmax_rows
from engine.sampling_params import SamplingParams

_MASK64 = (1 << 63) - 1


def mix_seed(seed: int, index: int) -> int:
    """A 63-bit seed for output position ``index`` (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK64


@dataclass
class SampleRequest:
    params: SamplingParams
    seed: int
    output_index: int  # index of the token being sampled among the request's outputs
    history: list[int] | None  # prompt + output ids (only when a repetition penalty applies)


@dataclass
class SampleResult:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def apply_repetition_penalty(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    """HF semantics: seen tokens' positive logits are divided, negative multiplied."""
    idx = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
    vals = logits.index_select(0, idx)
    logits = logits.clone()
    logits.index_copy_(0, idx, torch.where(vals > 0, vals / penalty, vals * penalty))
    return logits


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p masking. Returns probabilities."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        cum = torch.cumsum(sp, dim=-1)
        drop = (cum - sp) > p.top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def sample(logits: torch.Tensor, reqs: list[SampleRequest]) -> list[SampleResult]:
    """Sample one token per row of ``logits`` ([N, V], float32)."""
    n = logits.shape[0]
    simple_greedy = all(r.params.greedy and r.params.repetition_penalty == 1.0 for r in reqs)
    want_lp = any(r.params.logprobs is not None for r in reqs)
    if simple_greedy:
        toks = argmax_rows(logits)  # torch.argmax's indices, without an OpenMP region (#17)
    else:
        toks = []
        for i, r in enumerate(reqs):
            row = logits[i]
            if r.params.repetition_penalty != 1.0 and r.history:
                row = apply_repetition_penalty(row, r.history, r.params.repetition_penalty)
            if r.params.greedy:
                toks.append(int(row.argmax()))
                continue
            probs = _filter(row, r.params)
            g = torch.Generator(device=row.device).manual_seed(mix_seed(r.seed, r.output_index))
            e = torch.empty_like(probs).exponential_(generator=g)
            toks.append(int((probs / e).argmax()))
    results = [SampleResult(t) for t in toks]
    if want_lp:
        lp = torch.log_softmax(logits, dim=-1)
        for i in range(n):
            k = reqs[i].params.logprobs
            if k is None:
                continue
            results[i].logprob = float(lp[i, toks[i]])
            if k > 0:
                v, ix = torch.topk(lp[i], k)
                results[i].top_logprobs = list(zip(ix.tolist(), v.tolist(), strict=True))
    return results
