"""Speculative (rejection) sampling of a draft model's drafts (#17; Leviathan et al. 2023,
Chen et al. 2023), with seeded, per-index randomness.

For drafts ``x_0..x_{k-1}`` drawn from the draft's distributions ``q_j`` and the target's
distributions ``p_j`` at the same positions (both after temperature, top-k/p, min-p and the
repetition penalty: :func:`processed_probs`): draft ``j`` is kept when ``u_j * q_j(x_j) <=
p_j(x_j)`` (probability ``min(1, p/q)``); the first one that is not is replaced by a draw from
``norm(max(0, p_j - q_j))``; when all are kept, the target's own sample at position ``k`` (the
bonus token) follows. Every emitted token is then distributed as the target's.

Randomness: ``u_j`` and the residual draw at output index ``i`` come from generators seeded with
:func:`engine.sampler.mix_seed` of the request's seed (xor a constant per use) and ``i``, so a
run is a function of the seed, the models and the drafts each step verified: reproducible and
independent of the batch while every step gets the drafts ``k`` allows. A step drafting fewer
(free KV blocks, the draft pool or the token budget short) or a preempted request's recompute
(its next token sampled without drafts) draws other, equally distributed, tokens: under memory
pressure a seeded run need not repeat (:class:`~engine.spec_decode.config.DraftAcceptance`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.sampler import SampleRequest, _filter, apply_repetition_penalty, mix_seed

_UNIFORM_SALT = 0x5EC0_0001  # the acceptance uniforms' seed stream
_RESIDUAL_SALT = 0x5EC0_0002  # the residual draws' seed stream


def processed_probs(logits_row: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    """The distribution ``req`` samples from given one row of raw logits (float32): the
    repetition penalty, then temperature, top-k, top-p, min-p (:mod:`engine.sampler`)."""
    row = logits_row.float()
    if req.params.repetition_penalty != 1.0 and req.history:
        row = apply_repetition_penalty(row, req.history, req.params.repetition_penalty)
    return _filter(row, req.params)


def _generator(seed: int, salt: int, index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix_seed(seed ^ salt, index))


def rejection_sample(
    p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int], bonus: int, seed: int, first_index: int
) -> tuple[list[int], int]:
    """Run speculative sampling over one request's ``k = len(drafts)`` drafts.

    ``p``: the target's processed distributions ``[k + 1, V]`` (row ``j``: after the drafts
    before ``j``); ``q``: the draft's ``[k, V]``; ``bonus``: the target's own sample at position
    ``k`` (emitted when every draft is kept); ``first_index``: the output index of position 0.
    Returns (the emitted tokens: the kept drafts then one more, ``accepted``)."""
    k = len(drafts)
    if p.shape[0] != k + 1 or q.shape[0] != k:
        raise ValueError(f"rejection_sample needs {k + 1} target rows and {k} draft rows for {k} drafts")
    out: list[int] = []
    for j, d in enumerate(drafts):
        qd = float(q[j, d])
        pd = float(p[j, d])
        g = _generator(seed, _UNIFORM_SALT, first_index + j, p.device)
        u = float(torch.rand((), generator=g, device=p.device))
        if qd > 0.0 and u * qd <= pd:
            out.append(int(d))
            continue
        residual = torch.clamp(p[j] - q[j], min=0.0)
        residual[d] = 0.0  # p(d) < q(d) here: the residual has no mass at d (exactly 0, not rounding)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding (cannot reject then, but be safe)
            residual = p[j].clone()
            residual[d] = 0.0
        g = _generator(seed, _RESIDUAL_SALT, first_index + j, p.device)
        e = torch.empty_like(residual).exponential_(generator=g)
        out.append(int((residual / e).argmax()))
        return out, j
    out.append(int(bonus))
    return out, k
