"""Draft-model speculation (#17): a small model of the target's vocabulary proposes the drafts.

The draft model has its own paged KV cache (its own block pool, :class:`DraftModelProposer`),
one sequence per decoding target request, keyed by request id. A sequence remembers the tokens
whose draft KV it holds; before drafting, the part that no longer matches the request's tokens
(rejected drafts, a recomputed or handed-off request) is rolled back and the rest caught up in
one chunked forward pass, then ``k`` decode steps draft ``k`` tokens, batched across requests.
So the draft cache follows whatever the target did (speculation, preemption, swap, prefix-cache
reuse, the prefill -> decode handoff) without being told: it is a cache of the request's own
tokens, validated against them on every use. :meth:`DraftModelProposer.retain` drops the
sequences of requests that are no longer running (finished, aborted, preempted, swapped), so
the pool holds at most the running requests' tokens plus their last drafts.

Each draft token at output index ``i`` is sampled with the request's own sampling rule, seed and
index (:func:`engine.sampler.sample`): for greedy requests the draft's argmax, for sampled ones
the draft's distribution ``q`` drawn with the same exponential-race noise the target uses at
``i`` (the coupled rule, :class:`~engine.spec_decode.config.DraftAcceptance`). With
``DraftAcceptance.REJECTION`` the proposer also keeps each draft's ``q`` row for the target's
rejection sampling (:meth:`DraftModelProposer.draft_probs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from engine.block_manager import KVCacheManager
from engine.model_runner import ModelRunner
from engine.request import Request
from engine.sampler import SampleRequest, sample
from engine.scheduler import ScheduledRequest
from engine.spec_decode.config import DraftAcceptance, SpeculativeConfig
from engine.spec_decode.rejection import processed_probs


@dataclass
class _DraftSeq:
    """One request's draft-model sequence: ``req`` is a shadow request whose prompt is the token
    list the draft KV covers (``req.num_computed_tokens`` of them computed); ``drafts`` /
    ``q`` the last proposal and (rejection acceptance) its draft distributions; ``at``: the
    target request's token count when they were made."""

    req: Request
    drafts: tuple[int, ...] = ()
    q: torch.Tensor | None = None
    at: int = -1
    q_rows: list[torch.Tensor] = field(default_factory=list)


class DraftModelProposer:
    """Drafts ``config.num_speculative_tokens`` tokens per decoding request with ``model``.

    ``num_blocks`` / ``block_size``: the draft KV pool (when it is full a request is drafted
    fewer tokens or none: drafting never blocks the target). ``seed_of(request_id)``: the
    sampling seed the target's runner uses for the request (draft tokens are sampled with it).
    ``max_model_len``: drafts never run past it."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: SpeculativeConfig,
        dtype: torch.dtype,
        device: torch.device,
        num_blocks: int,
        block_size: int,
        seed_of: Callable[[str], int],
        max_model_len: int,
    ) -> None:
        self.k = config.num_speculative_tokens
        self.keep_q = config.acceptance is DraftAcceptance.REJECTION
        self.kv = KVCacheManager(num_blocks, block_size, "draft", enable_prefix_caching=False)
        self.runner = ModelRunner(model, self.kv, dtype, device)
        self.seed_of = seed_of
        self.max_model_len = max_model_len
        self._seqs: dict[str, _DraftSeq] = {}
        self.forward_passes = 0  # draft forward passes run (catch-up and draft steps)

    # ------------------------------------------------------------------ public
    def propose(self, req: Request, at_most: int) -> list[int]:
        """The scheduler's drafter: up to ``at_most`` drafts continuing ``req``; those of the
        last :meth:`prepare` when they were made for its current tokens, else drafted now."""
        st = self._seqs.get(req.request_id)
        if st is None or st.at != req.num_tokens:
            self.prepare([req])
            st = self._seqs.get(req.request_id)
            if st is None:
                return []
        return list(st.drafts[:at_most])

    def prepare(self, requests: Iterable[Request]) -> None:
        """Draft, batched, for every decoding request in ``requests`` (one pending token, not
        prefill-only), each up to what its step may emit beyond one token."""
        todo: list[tuple[Request, int]] = []
        for r in requests:
            if r.prefill_only or not r.is_decoding:
                continue
            room = min(
                self.k,
                r.sampling_params.max_tokens - r.num_output_tokens - 1,
                self.max_model_len - r.num_tokens - 1,
            )
            if room > 0:
                todo.append((r, room))
        if todo:
            self._draft(todo)

    def draft_probs(self, request_id: str, drafts: Sequence[int]) -> torch.Tensor | None:
        """The draft distributions ``q`` (``[len(drafts), vocab]``) of ``drafts`` when they are
        (a prefix of) the request's last proposal made with rejection acceptance, else None."""
        st = self._seqs.get(request_id)
        if st is None or st.q is None or tuple(drafts) != st.drafts[: len(drafts)]:
            return None
        return st.q[: len(drafts)]

    def retain(self, request_ids: set[str]) -> None:
        """Free the draft KV of every sequence whose request is not in ``request_ids``."""
        for rid in [r for r in self._seqs if r not in request_ids]:
            self.release(rid)

    def release(self, request_id: str) -> None:
        """Free one request's draft KV (unknown ids: no-op)."""
        if self._seqs.pop(request_id, None) is not None:
            self.kv.free(request_id)

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    # ------------------------------------------------------------------ drafting
    def _sync(self, req: Request) -> _DraftSeq | None:
        """Roll the request's draft sequence back to the longest prefix of its tokens it holds
        (at most all but the last token: the last one is always fed to get logits) and make it
        cover exactly the request's tokens; None if the pool has no room."""
        toks = req.all_token_ids()
        st = self._seqs.get(req.request_id)
        if st is None:
            st = _DraftSeq(Request(req.request_id, [], req.sampling_params))
            self._seqs[req.request_id] = st
        held = st.req.prompt_token_ids
        n = min(st.req.num_computed_tokens, len(toks) - 1)
        common = 0
        while common < n and held[common] == toks[common]:
            common += 1
        st.req.prompt_token_ids = toks
        st.req.num_computed_tokens = common
        self.kv.trim(req.request_id, common)
        st.drafts, st.q, st.at, st.q_rows = (), None, req.num_tokens, []
        if not self.kv.allocate_slots(st.req, len(toks) - common):
            self.release(req.request_id)
            return None
        return st

    def _draft(self, todo: list[tuple[Request, int]]) -> None:
        live: list[tuple[Request, int, _DraftSeq]] = []
        for r, room in todo:
            st = self._sync(r)
            if st is not None:
                live.append((r, room, st))
        step = 0
        while live:
            items = [
                ScheduledRequest(
                    st.req, st.req.num_tokens - st.req.num_computed_tokens, st.req.num_computed_tokens
                )
                for _, _, st in live
            ]
            rows = self._forward(items)
            sreqs = [self._sample_request(r, st, step) for r, _, st in live]
            logits = self.runner.model.compute_logits(rows)
            res = sample(logits, sreqs)
            nxt: list[tuple[Request, int, _DraftSeq]] = []
            for i, (r, room, st) in enumerate(live):
                st.req.num_computed_tokens = st.req.num_tokens
                d = res[i].token
                st.drafts = (*st.drafts, d)
                if self.keep_q and not r.sampling_params.greedy:
                    st.q_rows.append(processed_probs(logits[i], sreqs[i]))
                if len(st.drafts) < room:
                    st.req.prompt_token_ids = [*st.req.prompt_token_ids, d]
                    if self.kv.allocate_slots(st.req, 1):
                        nxt.append((r, room, st))
                        continue
                    st.req.prompt_token_ids = st.req.prompt_token_ids[:-1]
                if st.q_rows:  # this request's drafting is over
                    st.q = torch.stack(st.q_rows)
                    st.q_rows = []
            live = nxt
            step += 1

    def _forward(self, items: list[ScheduledRequest]) -> torch.Tensor:
        """One draft forward pass over ``items`` (decodes first, as the runner orders them);
        returns the hidden state of each item's last token, in ``items``' order."""
        order = sorted(range(len(items)), key=lambda i: 0 if self.runner._is_decode(items[i]) else 1)
        ordered = [items[i] for i in order]
        ids, pos, md = self.runner._metadata(ordered)
        hidden = self.runner.forward(ids, pos, md)
        self.forward_passes += 1
        last: list[int] = [0] * len(items)
        off = 0
        for i in order:
            off += items[i].num_new_tokens
            last[i] = off - 1
        return hidden[torch.tensor(last, device=hidden.device)]

    def _sample_request(self, req: Request, st: _DraftSeq, j: int) -> SampleRequest:
        """Draft ``j`` is sampled as the target samples output index ``num_output_tokens + j``."""
        p = req.sampling_params
        hist = req.all_token_ids() + list(st.drafts) if p.repetition_penalty != 1.0 else None
        index = req.num_output_tokens + j + p.seed_position_offset
        return SampleRequest(p, self.seed_of(req.request_id), index, hist)
