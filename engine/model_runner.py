"""Turns a SchedulerOutput into one forward pass over the paged KV cache and samples tokens.

Owns the model and the KV cache tensor ``[num_layers, 2, num_blocks, block_size, kvh, hd]``.
Also implements the KV export/import used by the disaggregated roles: a block's bytes are, for
each layer in order, K then V ``[block_size, kvh, hd]`` (``export_blocks`` returns
``[n, num_layers, 2, block_size, kvh, hd]``, contiguous).

With a host block pool (``num_host_blocks`` > 0) the runner also owns its tensors
(:class:`engine.swap_space.HostKVCache`) and, at the start of :meth:`ModelRunner.execute`, does
the step's swap copies (``SchedulerOutput.swap_out`` then ``swap_in``) before the forward pass.

Decode attention runs on one backend chosen explicitly when the runner is built
(:mod:`engine.attention_backends`: ``attention_backend``, else ``PDSERVE_ATTENTION``, else
``auto``; a named backend that cannot run here is refused). With ``cuda_graph`` a step of decode
rows only is replayed from a CUDA graph per batch-size bucket (:mod:`engine.attention_graphs`;
needs CUDA and the ``torch_paged`` backend); other steps run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, PrefillSlice, decode_rows
from engine.attention_backends import AttentionBackend, probe, requested_backend, resolve_backend
from engine.attention_graphs import DecodeBatch, DecodeGraphs, GraphMode
from engine.block_manager import NULL_BLOCK, KVCacheManager
from engine.models.linear_native import NativeLinear
from engine.models.llama import LlamaForCausalLM
from engine.models.quant import uses_native_int8
from engine.request import Request
from engine.sampler import SampleRequest, SampleResult, sample
from engine.scheduler import ScheduledRequest, SchedulerOutput
from engine.swap_space import HostKVCache
from pdserve.errors import FailedPreconditionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def block_nbytes(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize


class ModelRunner:
    """One device's model and KV cache. ``shape`` is the KV layout of the whole model (what
    export/import exchange); ``local_kv_heads`` the heads this runner's cache holds (a tensor-
    parallel shard holds ``num_key_value_heads / tp``; default: all)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv: KVCacheManager,
        dtype: torch.dtype,
        device: torch.device,
        local_kv_heads: int | None = None,
        num_host_blocks: int = 0,
        attention_backend: str | AttentionBackend | None = None,
        cuda_graph: bool = False,
        cuda_graph_max_batch: int = 64,
        max_model_len: int | None = None,
    ) -> None:
        """``attention_backend``: the decode attention backend (None: ``PDSERVE_ATTENTION``, else
        ``auto``); ``cuda_graph``: replay decode steps of up to ``cuda_graph_max_batch`` rows from
        CUDA graphs, tables up to ``max_model_len`` tokens (None: the model's maximum)."""
        cfg = model.config
        self.model = model
        self.kv = kv
        self.device = device
        self.dtype = dtype
        self.block_size = kv.block_size
        self.shape = KVShape(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, kv.block_size, dtype
        )
        self.local_kv_heads = local_kv_heads or cfg.num_key_value_heads
        self.kv_cache = torch.zeros(
            cfg.num_hidden_layers,
            2,
            kv.num_blocks,
            kv.block_size,
            self.local_kv_heads,
            cfg.head_dim,
            dtype=dtype,
            device=device,
        )
        self.host_cache = HostKVCache(num_host_blocks, self.kv_cache) if num_host_blocks else None
        self.seeds: dict[str, int] = {}
        # rejection sampling of draft-model drafts (engine.spec_decode.rejection): the draft
        # distributions of a request's drafts, or None (then the coupled rule: match)
        self.draft_probs: Callable[[str, tuple[int, ...]], torch.Tensor | None] | None = None
        self.windows = sorted(cfg.windows)  # the layers' distinct sliding windows
        self._group = cfg.num_attention_heads // cfg.num_key_value_heads
        self.decode_backend = self._resolve_backend(requested_backend(attention_backend))
        self.fused_reason = self._select_fused()  # None: the model's fused native forward is on
        self._workspace: torch.Tensor | None = None  # FlashInfer's, allocated on first use
        self.graphs: DecodeGraphs | None = None
        if cuda_graph:
            if device.type != "cuda":
                raise FailedPreconditionError(
                    f"cuda_graph needs a CUDA device (this runner's is {device.type}): set cuda_graph=False"
                )
            max_len = max_model_len or cfg.max_position_embeddings
            self.enable_decode_graphs(GraphMode.CUDA, cuda_graph_max_batch, -(-max_len // kv.block_size))

    # ------------------------------------------------------------------ fused small ops
    def _select_fused(self) -> str | None:
        """Turn on the model's fused native forward (:mod:`engine.models.fused_native`) under the
        native linear's selection: when the model's projections took the native linear (float32
        on the CPU, ``EngineConfig.linear`` auto/native) or the native int8 linear
        (``weight_dtype`` int8) and the model can take it. Returns why
        it stays off (None: on); the reason is logged, as the linear's ``auto`` is."""
        model = self.model
        if not any(isinstance(m, NativeLinear) for m in model.modules()) and not uses_native_int8(model):
            return "the projections do not use the native linear"
        why = (
            model.fused_unsupported_reason()
            if isinstance(model, LlamaForCausalLM)
            else "not a Llama-family model"
        )
        if why is None:
            model.enable_fused()
        else:
            log.info("fused native small ops off: %s", why)
        return why

    # ------------------------------------------------------------------ attention backend
    def _resolve_backend(self, requested: AttentionBackend) -> AttentionBackend:
        dtype_name = str(self.dtype).removeprefix("torch.")
        facts = probe(self.device.type, dtype_name, self.block_size, self._group, self.shape.head_dim)
        return resolve_backend(requested, facts)

    @property
    def native_decode(self) -> bool:
        """Whether decodes use the native in-place kernel (engine.attention_native)."""
        return self.decode_backend is AttentionBackend.NATIVE

    @native_decode.setter
    def native_decode(self, on: bool) -> None:
        """Switch between the native kernel (refused where it cannot run) and the gather path."""
        self.decode_backend = self._resolve_backend(
            AttentionBackend.NATIVE if on else AttentionBackend.GATHER
        )

    def set_decode_backend(self, backend: str | AttentionBackend) -> None:
        """Use ``backend`` for decodes from the next step on (refused, naming it, where it cannot
        run; with decode graphs only ``torch_paged``)."""
        b = self._resolve_backend(AttentionBackend.parse(backend))
        if self.graphs is not None and b is not AttentionBackend.TORCH_PAGED:
            raise FailedPreconditionError("decode graphs need the 'torch_paged' attention backend")
        self.decode_backend = b

    def enable_decode_graphs(self, mode: GraphMode, max_batch: int, max_width: int) -> None:
        """Serve decode-only steps through padded static buffers per batch bucket
        (:class:`engine.attention_graphs.DecodeGraphs`; ``GraphMode.CUDA`` captures and replays,
        ``GraphMode.EAGER`` runs the same buffers eagerly). Appends the padding's scratch block
        to the KV cache: call it before the cache is shared or written."""
        if self.graphs is not None:
            raise RuntimeError("decode graphs are already enabled")
        if self.decode_backend is not AttentionBackend.TORCH_PAGED:
            raise FailedPreconditionError(
                f"decode graphs need attention_backend='torch_paged' (this runner's is "
                f"{self.decode_backend.value!r}): its loop bounds are static per bucket"
            )
        if self.local_kv_heads != self.shape.num_kv_heads:
            raise FailedPreconditionError("decode graphs are not supported with tensor parallelism")
        scratch = self.kv_cache.shape[2]
        pad = torch.zeros_like(self.kv_cache[:, :, :1])
        self.kv_cache = torch.cat([self.kv_cache, pad], dim=2)
        self.graphs = DecodeGraphs(
            self.model,
            self.kv_cache,
            self.block_size,
            self.windows,
            max_batch,
            max_width,
            scratch,
            trimmed=self.kv.sliding_window is not None,
            mode=mode,
        )

    # ------------------------------------------------------------------ step
    def _metadata(self, items: list[ScheduledRequest]) -> tuple[list[int], list[int], AttentionMetadata]:
        """Token ids, positions and attention metadata of the batch.

        Block tables start at the request's first block still in use: past the blocks the KV
        manager dropped out of the sliding window (``num_skippable_blocks``, the same rule it
        frees by), so a freed block is never gathered; a table that would reach one raises.

        A speculative decode (``spec_token_ids``) feeds its pending token then its drafts. With
        the in-place kernel each of its ``1 + k`` tokens is a decode row of its own over the
        same block table, attending to the keys up to its own position (causal within the new
        tokens: the K/V of all of them is written before attention reads); on the gather path
        it is a chunk continuing the sequence (the causal mask offset by the context).
        """
        ids, pos, slots, dec, prefills, trimmed = self._lists(items)
        return ids, pos, self._build_metadata(slots, dec, prefills, trimmed)

    def _lists(
        self, items: list[ScheduledRequest]
    ) -> tuple[list[int], list[int], list[int], DecodeBatch, list[PrefillSlice], bool]:
        """The batch's token ids, positions, slots, decode rows (as a :class:`DecodeBatch`:
        each row's token, position, slot, table, length and table start), prefill slices and
        whether a table was trimmed (see :meth:`_metadata`)."""
        bs = self.block_size
        kv = self.kv
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        dec_starts: list[int] = []
        dec_idx: list[int] = []  # each decode row's index in ids
        prefills: list[PrefillSlice] = []
        trimmed = False
        for s in items:
            req = s.request
            table = kv.block_table(req.request_id)
            end = s.start + s.num_new_tokens
            spec = s.spec_token_ids
            ids.extend(req.token_slice(s.start, end - len(spec)))
            ids.extend(spec)
            rng = range(s.start, end)
            pos.extend(rng)
            first = kv.num_skippable_blocks(s.start, req.prefill_only) if kv.sliding_window else 0
            if first:
                trimmed = True
            if table[first] == NULL_BLOCK:
                raise RuntimeError(
                    f"request {req.request_id}: block {first} was freed but is still in the window"
                )
            slots.extend(table[p // bs] * bs + p % bs for p in rng)
            if self._is_decode(s):
                tab = table[first : end // bs + (1 if end % bs else 0)]
                for i, p in enumerate(rng):  # one row per query token (several when speculative)
                    dec_idx.append(len(ids) - s.num_new_tokens + i)
                    dec_tables.append(tab)
                    dec_lens.append(p + 1)
                    dec_starts.append(first * bs)
            else:
                bt = None
                if s.start > 0:
                    nblk = -(-end // bs)
                    bt = torch.tensor(table[first:nblk], dtype=torch.long, device=self.device)
                prefills.append(
                    PrefillSlice(len(ids) - s.num_new_tokens, s.num_new_tokens, s.start, bt, first * bs)
                )
        dec = DecodeBatch(
            [ids[i] for i in dec_idx], [pos[i] for i in dec_idx], [slots[i] for i in dec_idx],
            dec_tables, dec_lens, dec_starts,
        )  # fmt: skip
        return ids, pos, slots, dec, prefills, trimmed

    def _build_metadata(
        self, slots: list[int], dec: DecodeBatch, prefills: list[PrefillSlice], trimmed: bool
    ) -> AttentionMetadata:
        bs = self.block_size
        dev = self.device
        dec_tables, dec_lens, dec_starts = dec.tables, dec.lens, dec.starts
        dtab = dmask = rows = plan = None
        wmasks: dict[int, torch.Tensor] = {}
        if dec_tables and self.decode_backend.reads_rows:
            rows = decode_rows(dec_tables, dec_lens, dec_starts, self.windows, bs, self.kv.num_blocks, dev)
            if self.decode_backend in (AttentionBackend.FLASHINFER, AttentionBackend.FLASH_ATTN):
                plan = self._decode_plan(rows)
        elif dec_tables:
            width = max(len(t) for t in dec_tables)
            dtab = torch.tensor(
                [t + [0] * (width - len(t)) for t in dec_tables], dtype=torch.long, device=dev
            )
            lens = torch.tensor(dec_lens, dtype=torch.long, device=dev).unsqueeze(1)
            kpos = torch.arange(width * bs, device=dev).unsqueeze(0)  # key position of each column
            if trimmed:
                kpos = kpos + torch.tensor(dec_starts, dtype=torch.long, device=dev).unsqueeze(1)
            full = kpos < lens  # key <= query (= len - 1)
            dmask = full[:, None, None, :]
            for w in self.windows:  # and query - key < w
                wmasks[w] = (full & (kpos >= lens - w))[:, None, None, :]
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(dec_tables),
            decode_block_tables=dtab,
            decode_mask=dmask,
            prefills=prefills,
            block_size=bs,
            decode_window_masks=wmasks,
            trimmed=trimmed,
            decode_rows=rows,
            decode_backend=self.decode_backend,
            decode_plan=plan,
        )
        return md

    def _decode_plan(self, rows):
        """The step's FlashInfer / flash-attn plan (engine.attention_cuda)."""
        from engine.attention_cuda import DecodePlan, new_workspace

        if self.decode_backend is AttentionBackend.FLASHINFER and self._workspace is None:
            self._workspace = new_workspace(self.device)
        cfg = self.model.config
        return DecodePlan(
            self.decode_backend, rows.tables, rows.hi, rows.first, self.block_size,
            cfg.num_attention_heads * self.local_kv_heads // cfg.num_key_value_heads,
            self.local_kv_heads, cfg.head_dim, self.dtype, self._workspace,
        )  # fmt: skip

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, SampleResult | list[SampleResult]]:
        """Do the step's swap copies, run one forward pass; return the sampled result of every
        request that samples: for a speculative decode (``spec_token_ids``, k drafts) the list of
        its ``k + 1`` results, position ``j`` sampled from the logits after the pending token
        and drafts ``0..j-1`` with output index ``num_output_tokens + j`` (the token a plain
        decode would sample there; :func:`engine.spec_decode.verify` keeps the agreeing run)."""
        self.swap(out)
        if out.is_empty:
            return {}
        # decodes first (batched attention), then prefill chunks
        items = sorted(out.scheduled, key=lambda s: 0 if self._is_decode(s) else 1)
        ids, pos, slots, dec, prefills, trimmed = self._lists(items)
        dev = self.device
        hidden = None
        if self.graphs is not None and not prefills and self.decode_backend is AttentionBackend.TORCH_PAGED:
            hidden = self.graphs.forward(dec)  # None: more rows than the largest bucket
        if hidden is None:
            hidden = self.forward(ids, pos, self._build_metadata(slots, dec, prefills, trimmed))
        rows: list[int] = []
        sreqs: list[SampleRequest] = []
        spans: list[tuple[str, int, bool]] = []  # request id, rows, speculative
        spec_of: dict[str, tuple[int, ...]] = {}
        off = 0
        for s in items:
            off += s.num_new_tokens
            if not s.samples:
                continue
            k = len(s.spec_token_ids)
            rows.extend(range(off - 1 - k, off))
            sreqs.extend(self._sample_request(s.request, s.spec_token_ids[:j]) for j in range(k + 1))
            spans.append((s.request.request_id, k + 1, k > 0))
            spec_of[s.request.request_id] = s.spec_token_ids
        if not rows:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=dev)])
        sampled = sample(logits, sreqs)
        results: dict[str, SampleResult | list[SampleResult]] = {}
        i = 0
        for rid, n, spec in spans:
            results[rid] = sampled[i : i + n] if spec else sampled[i]
            if spec and self.draft_probs is not None and not sreqs[i].params.greedy:
                q = self.draft_probs(rid, spec_of[rid])
                if q is not None:
                    results[rid] = self._rejection(
                        logits[i : i + n], sreqs[i : i + n], q, spec_of[rid], sampled[i + n - 1]
                    )
            i += n
        return results

    def _rejection(
        self,
        logits: torch.Tensor,
        sreqs: list[SampleRequest],
        q: torch.Tensor,
        drafts: tuple[int, ...],
        bonus: SampleResult,
    ) -> list[SampleResult]:
        """A speculative decode's ``k + 1`` results under rejection sampling
        (:func:`engine.spec_decode.rejection.rejection_sample`): the kept drafts, then the
        replacement or bonus token, then copies of it (never read: the run ends at the first
        token that differs from its draft, and a replacement always differs, the residual
        having no mass at the rejected draft). Log-probs are of the raw target distribution."""
        from engine.spec_decode.rejection import processed_probs, rejection_sample

        p = torch.stack([processed_probs(logits[j], sreqs[j]) for j in range(len(sreqs))])
        toks, _ = rejection_sample(p, q, drafts, bonus.token, sreqs[0].seed, sreqs[0].output_index)
        toks = toks + [toks[-1]] * (len(sreqs) - len(toks))
        out = [SampleResult(t) for t in toks]
        if sreqs[0].params.logprobs is not None:
            lp = torch.log_softmax(logits, dim=-1)
            k = sreqs[0].params.logprobs
            for j, r in enumerate(out):
                r.logprob = float(lp[j, r.token])
                if k > 0:
                    v, ix = torch.topk(lp[j], k)
                    r.top_logprobs = list(zip(ix.tolist(), v.tolist(), strict=True))
        return out

    def _is_decode(self, s: ScheduledRequest) -> bool:
        """Whether ``s`` runs as decode rows: one token continuing a sequence, or a speculative
        decode when the in-place kernel serves decodes (else its tokens are a chunk, see
        :meth:`_metadata`)."""
        return s.start > 0 and (
            s.num_new_tokens == 1 or (bool(s.spec_token_ids) and self.decode_backend.reads_rows)
        )

    def swap(self, out: SchedulerOutput) -> None:
        """Copy the step's swapped-out blocks to the host and swapped-in blocks back (in that
        order). Raises if the step swaps and this runner has no host cache."""
        if not out.swap_out and not out.swap_in:
            return
        if self.host_cache is None:
            raise RuntimeError("the scheduler swapped blocks but this model runner has no host KV cache")
        self.host_cache.swap(self.kv_cache, out.swap_out, out.swap_in)

    def forward(self, ids: list[int], pos: list[int], md: AttentionMetadata) -> torch.Tensor:
        """One forward pass over the flattened batch: hidden states ``[T, hidden]``."""
        dev = self.device
        return self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            self.kv_cache,
            md,
        )

    def close(self) -> None:
        """Free what the runner holds beyond memory (nothing for a single-device runner)."""

    def _sample_request(self, req: Request, drafts: tuple[int, ...] = ()) -> SampleRequest:
        """How ``req``'s next token is sampled; ``drafts``: the drafted tokens before the scored
        position (a speculative decode's position ``len(drafts)``: its output index and
        repetition-penalty history are those of a plain decode after those tokens)."""
        p = req.sampling_params
        hist = req.all_token_ids() + list(drafts) if p.repetition_penalty != 1.0 else None
        index = req.num_output_tokens + len(drafts) + p.seed_position_offset  # the output position
        return SampleRequest(p, self.seeds.get(req.request_id, 0), index, hist)

    # ------------------------------------------------------------------ KV export / import
    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_cache.index_select(2, idx).permute(2, 0, 1, 3, 4, 5).contiguous()

    def import_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv_cache.index_copy_(2, idx, blocks.to(self.device, self.dtype).permute(1, 2, 0, 3, 4, 5))
