"""The engine loop (nano-vllm / vLLM v1 style): add_request / step / abort, plus role hooks.

``step()`` = schedule -> one forward pass -> sample -> update scheduler -> detokenize. The same
engine serves three roles:

* whole: requests run from prompt to finish;
* prefill: ``add_request(..., prefill_only=True)`` stops after the first sampled token and keeps
  the request's KV; ``export_kv`` then returns its blocks and ``release`` frees them;
* decode: ``import_kv`` adopts exported blocks plus the first token and continues decoding.

Invariant: prefill -> export -> import -> decode yields exactly the tokens the whole engine yields.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.block_hash import BlockHash, chain_hashes
from engine.block_manager import NULL_BLOCK, KVCacheManager
from engine.config import EngineConfig
from engine.device import checked_device
from engine.kv_disk import DiskKVTier
from engine.kv_fit import group_import_blocks
from engine.kv_offload import OffloadedKV, offload_kv
from engine.lora import LoRAConfig, LoRAManager
from engine.model_runner import KVShape, ModelRunner
from engine.models.config import ModelConfig
from engine.models.linear_native import engine_linear
from engine.models.loader import load_model, resolve_dtype
from engine.offload import OffloadedWeights
from engine.offload_policy import BatchChoice, MemorySplit
from engine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from engine.parallel_sampling import SampleGroup, is_internal_id
from engine.request import FinishReason, Request, RequestStatus
from engine.sampler import SampleResult
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.spec_decode import DraftAcceptance, NgramProposer, SpecMethod, verify
from engine.spec_decode.draft_model import DraftModelProposer
from engine.swap_policy import RateEstimator
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from pdserve.errors import (
    InvalidRequestError,
    LayoutMismatchError,
    ModelNotFoundError,
    PdserveError,
    RequestNotFoundError,
    ResourceExhaustedError,
)

log = logging.getLogger(__name__)


@dataclass
class KVExport:
    """A request's KV after prefill, ready to move to a decode engine.

    ``block_hashes`` name every block (the last may be partial: see engine.block_hash);
    ``blocks`` is ``[n_blocks, num_layers, 2, block_size, kvh, hd]``.
    """

    request_id: str
    model_id: str
    token_ids: list[int]  # the prompt tokens whose KV is in ``blocks``
    first_token: int
    block_hashes: list[BlockHash]
    blocks: torch.Tensor
    shape: KVShape
    first_logprob: TokenLogprob | None = None


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    block_size: int
    token_budget: int
    prefill_tokens_computed: int
    prefill_tokens_reused: int
    decode_tokens: int
    num_preemptions: int
    num_steps: int
    num_swapped: int = 0  # requests whose KV is in the host pool now
    num_swap_outs: int = 0  # preemptions that swapped (cumulative, requests)
    num_swap_ins: int = 0
    swapped_out_blocks: int = 0  # blocks copied device -> host (cumulative)
    swapped_in_blocks: int = 0  # blocks copied host -> device (cumulative)
    host_blocks_total: int = 0
    host_blocks_used: int = 0
    # disk tier behind the host pool (EngineConfig.swap_disk_bytes; all 0 without it)
    disk_blocks_total: int = 0
    disk_blocks_used: int = 0
    disk_spills: int = 0  # swapped-out requests whose host blocks spilled to disk (cumulative)
    disk_promotions: int = 0  # requests whose disk blocks were read back to the host
    disk_spilled_blocks: int = 0
    disk_promoted_blocks: int = 0
    disk_full: int = 0  # preemptions that recomputed because the disk tier was full
    disk_fallbacks: int = 0  # swapped-out requests recomputed after a disk write/read fault
    disk_write_errors: int = 0  # blocks whose disk write failed
    disk_corrupt_blocks: int = 0  # blocks read back with a checksum mismatch / short read / error
    disk_seconds: float = 0.0  # time spent in disk writes and reads
    disk_enabled: bool = False  # spilling is on (a write error turns it off)
    swap_prefetches: int = 0  # requests swapped in ahead of their turn (in num_swap_ins)
    swap_prefetch_evictions: int = 0  # prefetched requests that gave their device blocks back
    spec_draft_tokens: int = 0  # speculative decoding: drafted tokens verified (cumulative)
    spec_accepted_tokens: int = 0  # of which the target model kept


@dataclass
class _Tracked:
    req: Request
    detok: IncrementalDetokenizer | None
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] = field(default_factory=list)
    emitted_tokens: int = 0
    group: SampleGroup | None = None  # a parallel-sampling choice: its group, index ``choice``
    choice: int = 0


def num_kv_blocks(config: EngineConfig, shape: KVShape) -> int:
    """The KV pool's size in blocks: ``config.num_kv_blocks``, else as many as
    ``kv_cache_memory_bytes`` holds on one rank (a tensor-parallel rank holds ``1/tp`` of a block)."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    per_rank = max(1, shape.block_nbytes // config.tensor_parallel_size)
    return max(1, config.kv_cache_memory_bytes // per_rank)


class LLMEngine:
    def __init__(
        self,
        model,
        model_config: ModelConfig,
        tokenizer: Tokenizer | None,
        config: EngineConfig,
        dtype: torch.dtype,
        device: torch.device,
        clock: Callable[[], float] = time.monotonic,
        runner_factory: Callable[[KVCacheManager], ModelRunner] | None = None,
        lora: LoRAConfig | None = None,
        weight_offload: OffloadedWeights | None = None,
        draft_model: torch.nn.Module | None = None,
    ) -> None:
        """``runner_factory(kv)`` builds the model runner (default: a single-device
        :class:`~engine.model_runner.ModelRunner` of ``model``; a tensor-parallel engine passes
        one building rank 0's :class:`~engine.tp_runner.TPModelRunner`). ``lora``: serve these
        LoRA adapters (engine.lora; the single-device or a tensor-parallel runner). ``weight_offload``: the model's
        offloaded layers (engine.offload), closed with the engine. ``draft_model``: the loaded
        draft model of ``SpecMethod.DRAFT_MODEL`` speculation (default: loaded from
        ``config.speculative.draft_model``; it must have the target's vocabulary)."""
        self.config = config
        drafter = None
        if config.speculative is not None:  # engine.spec_decode; EngineConfig refused the rest
            if lora is not None:
                raise InvalidRequestError("speculative decoding is not supported with LoRA adapters")
            if model_config.kv_window is not None:
                raise InvalidRequestError(
                    "speculative decoding is not supported for a model whose every layer has a sliding "
                    "window (its out-of-window KV blocks are freed, a roll-back could need them)"
                )
            if config.speculative.method is SpecMethod.NGRAM:
                proposer = NgramProposer(config.speculative)
                drafter = lambda req, at_most: proposer.propose(req.all_token_ids(), at_most)  # noqa: E731
        self.weight_offload = weight_offload
        self.offline_batch: BatchChoice | None = None  # EngineConfig.offline_batch's choice
        self.memory_split: MemorySplit | None = None  # EngineConfig.device_memory_budget_bytes's split
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.model_id = config.model_id or "model"
        self.clock = clock
        self.max_model_len = min(
            config.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings
        )
        bs = config.block_size
        shape = KVShape(
            model_config.num_hidden_layers, model_config.num_key_value_heads, model_config.head_dim, bs, dtype
        )
        nblocks = num_kv_blocks(config, shape)
        nhost = config.swap_space_bytes // shape.block_nbytes
        if config.swap_space_bytes and nhost < 1:
            raise ValueError(
                f"swap_space_bytes={config.swap_space_bytes} holds no KV block of {shape.block_nbytes} bytes: "
                "set 0 (recompute only) or at least one block's size"
            )
        if nhost and runner_factory is not None:
            raise ValueError("swap_space_bytes > 0 needs the default single-device model runner")
        ndisk = config.swap_disk_bytes // shape.block_nbytes
        if config.swap_disk_bytes and ndisk < 1:
            raise ValueError(
                f"swap_disk_bytes={config.swap_disk_bytes} holds no KV block of {shape.block_nbytes} bytes: "
                "set 0 (no disk tier) or at least one block's size"
            )
        # blocks out of the sliding window are freed only when every layer is windowed
        self.kv = KVCacheManager(
            nblocks,
            bs,
            self.model_id,
            config.enable_prefix_caching,
            sliding_window=model_config.kv_window,
            num_host_blocks=nhost,
            num_disk_blocks=ndisk,
        )
        self.rates = RateEstimator()
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_num_seqs=config.max_num_seqs,
                long_prefill_token_threshold=config.long_prefill_token_threshold,
                enable_chunked_prefill=config.enable_chunked_prefill,
                policy=config.scheduling_policy,
                max_model_len=self.max_model_len,
                mlfq_num_levels=config.mlfq_num_levels,
                mlfq_quantum_iters=config.mlfq_quantum_iters,
                mlfq_base_prefill_s=config.mlfq_base_prefill_s,
                mlfq_starvation_s=config.mlfq_starvation_s,
                mlfq_swap_watermark=config.mlfq_swap_watermark,
                mlfq_swap_backoff_iters=config.mlfq_swap_backoff_iters,
                mlfq_swap_backoff_max_iters=config.mlfq_swap_backoff_max_iters,
                mlfq_preempt_wait_iters=config.mlfq_preempt_wait_iters,
                swap_prefetch=config.swap_prefetch,
            ),
            self.kv,
            clock=clock,
            block_nbytes=shape.block_nbytes,
            prefill_time=self._predict_prefill_s,
            drafter=drafter,
        )
        self.runner = (
            runner_factory(self.kv)
            if runner_factory
            else ModelRunner(
                model,
                self.kv,
                dtype,
                device,
                num_host_blocks=nhost,
                attention_backend=config.attention_backend,
                cuda_graph=config.cuda_graph,
                cuda_graph_max_batch=min(config.cuda_graph_max_batch_size, config.max_num_seqs),
                max_model_len=self.max_model_len,
            )
        )
        self.kv_offload: OffloadedKV | None = None  # EngineConfig.kv_memory_budget_bytes
        if config.kv_memory_budget_bytes is not None:
            if runner_factory is not None:
                raise ValueError("kv_memory_budget_bytes needs the default single-device model runner")
            self.kv_offload = offload_kv(
                self.runner, self.kv, config.kv_memory_budget_bytes, config, self.max_model_len
            )
        self.disk_tier: DiskKVTier | None = None
        if ndisk:
            self.disk_tier = DiskKVTier(
                config.swap_disk_dir or tempfile.gettempdir(), ndisk, shape.block_nbytes
            )
        if nhost:
            self._measure_swap_bandwidth()
        if self.disk_tier is not None:
            self._measure_disk_bandwidth()
        self.draft: DraftModelProposer | None = None
        if config.speculative is not None and config.speculative.method is SpecMethod.DRAFT_MODEL:
            self.draft = self._draft_proposer(model_config, draft_model, nblocks, dtype, device)
            self.scheduler.drafter = self.draft.propose
            if config.speculative.acceptance is DraftAcceptance.REJECTION:
                self.runner.draft_probs = self.draft.draft_probs
        self.lora: LoRAManager | None = None
        if lora is not None and config.cuda_graph:
            raise InvalidRequestError(
                "cuda_graph=True is not supported with LoRA adapters: set cuda_graph=False"
            )
        if lora is not None:
            from engine.tp_runner import TPModelRunner

            tp_runner = self.runner if isinstance(self.runner, TPModelRunner) else None
            if runner_factory is not None and tp_runner is None:
                raise InvalidRequestError("LoRA adapters are not supported with a custom model runner")
            try:
                self.lora = LoRAManager(
                    self.runner.model,
                    model_config.model_type,
                    lora,
                    dtype,
                    device,
                    tp_size=1 if tp_runner is None else tp_runner.group.world_size,
                )
                if tp_runner is not None:
                    tp_runner.attach_lora(self.lora)  # the followers mirror its slots
            except BaseException:
                self.runner.close()  # a tensor-parallel runner's followers
                raise
        self._lora_pins: dict[str, str] = {}  # request id -> adapter whose slot it pins
        self._lora_waiting: dict[str, Request] = {}  # admitted, waiting for an adapter slot
        self.eos_token_ids = tuple(model_config.eos_token_ids) or (
            (tokenizer.eos_token_id,) if tokenizer and tokenizer.eos_token_id is not None else ()
        )
        self._tracked: dict[str, _Tracked] = {}
        self._prefilled: dict[str, _Tracked] = {}
        # parallel sampling (engine.parallel_sampling): client id -> group; parent id -> group;
        # client id -> (a template request: prompt, priority, arrival, salt; unfinished choice ids)
        self._groups: dict[str, SampleGroup] = {}
        self._group_parents: dict[str, SampleGroup] = {}
        self._group_state: dict[str, tuple[Request, set[str]]] = {}
        self._rng = random.Random(config.seed)
        self.num_steps = 0
        self.prefill_tokens_computed = 0
        self.prefill_tokens_reused = 0
        self.decode_tokens = 0
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0

    def _draft_proposer(
        self,
        model_config: ModelConfig,
        draft_model: torch.nn.Module | None,
        nblocks: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> DraftModelProposer:
        """The draft-model proposer: the draft loaded from its folder (unless given), checked to
        share the target's vocabulary (and tokenizer file, when both folders have one) and to
        reach the engine's context length; its KV pool holds as many blocks as the target's plus
        one draft block per sequence."""
        spec = self.config.speculative
        assert spec is not None and spec.draft_model is not None
        path = Path(spec.draft_model)
        if draft_model is None:
            try:
                dcfg = ModelConfig.from_path(path)
            except (OSError, ValueError) as e:
                raise InvalidRequestError(f"speculative draft_model {str(path)!r}: {e}") from e
            if dcfg.vocab_size != model_config.vocab_size:
                raise InvalidRequestError(
                    f"speculative draft_model {str(path)!r} has vocab_size {dcfg.vocab_size}, the target "
                    f"{model_config.vocab_size}: a draft model must share the target's tokenizer"
                )
            if dcfg.max_position_embeddings < self.max_model_len:
                raise InvalidRequestError(
                    f"speculative draft_model {str(path)!r} reaches {dcfg.max_position_embeddings} positions, "
                    f"the engine serves {self.max_model_len}: set max_model_len <= {dcfg.max_position_embeddings}"
                )
            if self.tokenizer is not None and (path / "tokenizer.json").is_file():
                probe = "def f(x):\n    return x  # speculative draft tokenizer check: Grüße, 数字 123"
                theirs = Tokenizer(path)
                if theirs.vocab_size != self.tokenizer.vocab_size or theirs.encode(
                    probe
                ) != self.tokenizer.encode(probe):
                    raise InvalidRequestError(
                        f"speculative draft_model {str(path)!r} has another tokenizer than the target"
                    )
            draft_model = load_model(
                path, dtype, device, max_positions=self.max_model_len, weight_dtype=self.config.weight_dtype
            )
        elif draft_model.config.vocab_size != model_config.vocab_size:
            raise InvalidRequestError(
                f"the draft model has vocab_size {draft_model.config.vocab_size}, the target "
                f"{model_config.vocab_size}: a draft model must share the target's tokenizer"
            )
        return DraftModelProposer(
            draft_model,
            spec,
            dtype,
            device,
            nblocks + self.config.max_num_seqs,
            self.config.block_size,
            lambda rid: self.runner.seeds.get(rid, 0),
            self.max_model_len,
        )

    # ------------------------------------------------------------------ swap rates
    def _predict_prefill_s(self, num_tokens: int) -> float:
        """Predicted prefill time of a prompt (MLFQ skip-join): the rate estimator's affine fit of
        measured prefill steps (``RateEstimator.predict_prefill_seconds``); 0 (top level) until a
        prefill step was measured."""
        return self.rates.predict_prefill_seconds(num_tokens)

    def _measure_swap_bandwidth(self, max_blocks: int = 8) -> None:
        """Seed the copy bandwidth: copy a few (still unused) blocks out to the host and back."""
        hc = self.runner.host_cache
        assert hc is not None
        n = min(max_blocks, hc.num_blocks, self.kv.num_blocks)
        pairs = [(i, i) for i in range(n)]
        hc.swap(self.runner.kv_cache, pairs, pairs)
        hc.synchronize()
        for nbytes, secs in hc.take_timings():
            self.rates.observe_copy(nbytes, secs)
        self.scheduler.set_swap_rates(self.rates.rates)

    def _measure_disk_bandwidth(self, max_blocks: int = 8) -> None:
        """Seed the disk bandwidth: write a few (still unused) host blocks to disk and read them back."""
        hc, dt = self.runner.host_cache, self.disk_tier
        assert hc is not None and dt is not None
        n = min(max_blocks, hc.num_blocks, dt.num_blocks)
        dt.write(hc.cache, [(i, i) for i in range(n)])
        dt.read(hc.cache, [(i, i) for i in range(n)])
        for nbytes, secs in dt.take_timings():
            self.rates.observe_disk(nbytes, secs)
        self.scheduler.set_swap_rates(self.rates.rates)

    def _disk_write(self, sched: SchedulerOutput) -> None:
        """Spill the step's ``disk_out`` host blocks to disk (before its swap-outs reuse their
        host slots). A failed write turns spilling off and sends the request that owned the
        block back to recompute (its KV is gone)."""
        hc, dt = self.runner.host_cache, self.disk_tier
        assert hc is not None and dt is not None
        hc.synchronize()  # earlier swap-outs may still be copying into these host slots (CUDA)
        bad = dt.write(hc.cache, sched.disk_out)
        if not bad:
            return
        log.warning(
            "KV disk tier: %d block write(s) failed under %s; spilling is off, the requests recompute",
            len(bad),
            dt.directory,
        )
        self.scheduler.disk_enabled = False
        for rid in sched.spilled:
            if bad.intersection(self.kv.disk_ids_of(rid)):
                self.scheduler.drop_swapped(rid)

    def _disk_read(self, sched: SchedulerOutput) -> None:
        """Promote the step's ``disk_in`` blocks to the host (after its swap-ins read their host
        slots); a block that fails its checksum sends its request back to recompute."""
        hc, dt = self.runner.host_cache, self.disk_tier
        assert hc is not None and dt is not None
        hc.synchronize()  # this step's swap-ins may still be reading these host slots (CUDA)
        bad = dt.read(hc.cache, sched.disk_in)
        if not bad:
            return
        log.warning(
            "KV disk tier: %d block(s) failed their checksum or read; the requests recompute", len(bad)
        )
        for rid in sched.promoted:
            if bad.intersection(self.kv.host_ids_of(rid)):
                self.scheduler.drop_swapped(rid)

    def _observe_step(
        self, sched: SchedulerOutput, prefill_tokens: int, decode_tokens: int, seconds: float
    ) -> None:
        """Feed the rate estimator: copy timings, and the step's prefill rate (its time minus
        synchronous copy time; a mixed step's decodes make it a conservative estimate), or a
        decode-only step's token rate (the recompute rate's stand-in before any prefill:
        ``RateEstimator.observe_decode``)."""
        hc = self.runner.host_cache
        copy_s = 0.0
        if hc is not None:
            for nbytes, secs in hc.take_timings():
                self.rates.observe_copy(nbytes, secs)
                if not hc.cuda:
                    copy_s += secs
        if self.disk_tier is not None:
            for nbytes, secs in self.disk_tier.take_timings():
                self.rates.observe_disk(nbytes, secs)
                copy_s += secs
        self.rates.observe_step(prefill_tokens, decode_tokens, seconds - copy_s)
        self.scheduler.set_swap_rates(self.rates.rates)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: EngineConfig | None = None, lora: LoRAConfig | None = None
    ) -> LLMEngine:
        config = config or EngineConfig()
        path = Path(path)
        device = checked_device(config.device)
        mcfg = ModelConfig.from_path(path)
        dtype = resolve_dtype(config.dtype, mcfg, device)
        max_len = min(config.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        tok = Tokenizer(path) if (path / "tokenizer.json").is_file() else None
        if config.model_id is None:
            from dataclasses import replace

            config = replace(config, model_id=path.name)
        if config.tensor_parallel_size > 1:
            return cls._tensor_parallel(path, mcfg, tok, config, dtype, device, max_len, lora)
        if lora is not None and config.weight_dtype != "float32":
            raise InvalidRequestError(
                f"LoRA adapters are not supported with weight_dtype {config.weight_dtype!r} (the adapter "
                "layers wrap float projections): use weight_dtype='float32'"
            )
        if lora is not None and config.weight_memory_budget_bytes is not None:
            raise InvalidRequestError(
                "LoRA adapters are not supported with weight offloading (weight_memory_budget_bytes)"
            )
        linear = engine_linear(
            config.linear,
            config.weight_memory_budget_bytes is not None or config.device_memory_budget_bytes is not None,
        )
        model = load_model(
            path, dtype, device, max_positions=max_len, weight_dtype=config.weight_dtype, linear=linear
        )
        offload = split = rates = None
        if config.device_memory_budget_bytes is not None:  # weights + KV, split by the cost model
            from engine.offload import apply_device_budget

            kvs = KVShape(
                mcfg.num_hidden_layers, mcfg.num_key_value_heads, mcfg.head_dim, config.block_size, dtype
            )
            nkv = num_kv_blocks(config, kvs)
            config, split, rates = apply_device_budget(config, model, nkv, kvs.block_nbytes // kvs.num_layers)
        if config.weight_memory_budget_bytes is not None:
            from engine.offload import offload_model

            offload = offload_model(
                model,
                config.weight_memory_budget_bytes,
                config.weight_host_budget_bytes,
                config.weight_offload_dir,
                rates=rates,
            )
        choice = None
        if offload is not None and config.offline_batch:  # EngineConfig.offline_batch
            from engine.offload import apply_offline_batch

            kvs = KVShape(
                mcfg.num_hidden_layers, mcfg.num_key_value_heads, mcfg.head_dim, config.block_size, dtype
            )
            config, choice = apply_offline_batch(config, offload, num_kv_blocks(config, kvs))
        eng = cls(model, mcfg, tok, config, dtype, device, lora=lora, weight_offload=offload)
        eng.offline_batch = choice
        eng.memory_split = split
        return eng

    @classmethod
    def _tensor_parallel(
        cls,
        path: Path,
        mcfg: ModelConfig,
        tok: Tokenizer | None,
        config: EngineConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
        lora: LoRAConfig | None = None,
    ) -> LLMEngine:
        """Rank 0 of a tensor-parallel engine: open the group, spawn the followers, shard
        (``lora``: the followers mirror the adapters' slots, engine.tp_runner)."""
        from engine.models.tp_shard import check_divisible, shard_model
        from engine.tp_group import TPGroup
        from engine.tp_runner import FollowerSpec, TPModelRunner, cpu_threads_per_rank, start_followers

        tp = config.tensor_parallel_size
        check_divisible(mcfg, tp)
        if device.type == "cuda" and torch.cuda.device_count() < tp:
            raise InvalidRequestError(
                f"tensor_parallel_size {tp} needs {tp} CUDA devices; {torch.cuda.device_count()} visible"
            )
        threads = torch.get_num_threads()
        if device.type == "cpu":  # the ranks share the host's cores (restored by close())
            torch.set_num_threads(cpu_threads_per_rank(tp))
        shape = KVShape(
            mcfg.num_hidden_layers, mcfg.num_key_value_heads, mcfg.head_dim, config.block_size, dtype
        )
        group = TPGroup(0, tp, device)
        spec = FollowerSpec(
            model_path=str(path),
            world_size=tp,
            host=group.host,
            port=group.port,
            num_blocks=num_kv_blocks(config, shape),
            block_size=config.block_size,
            dtype=str(dtype).removeprefix("torch."),
            device=device.type,
            max_positions=max_len,
        )
        followers = start_followers(spec)
        try:
            group.connect()
            model = shard_model(
                load_model(path, dtype, device, max_positions=max_len), 0, tp, group.all_reduce
            )
            try:
                group.barrier()  # every follower built its shard
            except RuntimeError as e:
                codes = [p.exitcode for p in followers]
                raise RuntimeError(
                    f"a tensor-parallel rank failed to start (exit codes of ranks 1..{tp - 1}: {codes}); "
                    f"see its log: {e}"
                ) from None
        except BaseException:
            for p in followers:
                p.terminate()
            torch.set_num_threads(threads)
            raise
        return cls(
            model,
            mcfg,
            tok,
            config,
            dtype,
            device,
            runner_factory=lambda kv: TPModelRunner(
                model, kv, dtype, device, group, followers, restore_threads=threads
            ),
            lora=lora,
        )

    def close(self) -> None:
        """Release what the engine holds beyond memory (a tensor-parallel engine's followers)."""
        self.runner.close()
        if self.disk_tier is not None:
            self.disk_tier.close()
        if self.lora is not None:
            self.lora.close()
        if self.weight_offload is not None:
            self.weight_offload.close()
        if self.kv_offload is not None:
            self.kv_offload.close()

    @property
    def kv_shape(self) -> KVShape:
        return self.runner.shape

    # ------------------------------------------------------------------ intake
    def _validate_prompt(self, ids: Sequence[int]) -> None:
        if len(ids) == 0:
            raise InvalidRequestError("prompt is empty: send at least one token")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens but the model's context is {self.max_model_len}: "
                "shorten it (at least one token must be left to generate)"
            )
        v = self.model_config.vocab_size
        bad = [t for t in ids if not (0 <= t < v)]
        if bad:
            raise InvalidRequestError(f"token ids out of range [0, {v}): {bad[:5]}")

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer: send prompt_token_ids")
        return self.tokenizer.encode(prompt)

    def _make_request(
        self,
        request_id: str | None,
        prompt: str | Sequence[int] | None,
        params: SamplingParams | None,
        priority: int,
        arrival_time: float | None,
        adapter_id: str,
        cache_salt: str,
        prefill_only: bool,
    ) -> Request:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty: send at least one token")
            ids: list[int] = self.tokenize(prompt)
        elif prompt is None:
            raise InvalidRequestError("a prompt (text or token ids) is required")
        else:
            ids = [int(t) for t in prompt]
        self._validate_prompt(ids)
        self.check_adapter(adapter_id)
        params = params or SamplingParams()
        rid = request_id or uuid.uuid4().hex
        if rid in self._tracked or rid in self._prefilled or rid in self._groups:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        if is_internal_id(rid):
            raise InvalidRequestError(f"request id {rid!r} contains a control character (\\x1f)")
        return Request(
            request_id=rid,
            prompt_token_ids=ids,
            sampling_params=params,
            arrival_time=self.clock() if arrival_time is None else arrival_time,
            priority=priority,
            eos_token_ids=self.eos_token_ids,
            adapter_id=adapter_id,
            cache_salt=cache_salt,
            prefill_only=prefill_only,
        )

    # ------------------------------------------------------------------ LoRA adapters
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters this engine serves."""
        return self.lora.names() if self.lora is not None else []

    def check_adapter(self, adapter_id: str) -> None:
        """Raise ModelNotFoundError when ``adapter_id`` (non-empty) is not served here: a request
        naming an adapter never runs on the base model."""
        if not adapter_id:
            return
        if self.lora is None:
            raise ModelNotFoundError(
                f"LoRA adapter {adapter_id!r} is not served: this engine serves only the base model"
            )
        self.lora.check(adapter_id)

    def _lora_pin(self, req: Request) -> bool:
        """Pin the request's adapter slot (True; also for base requests); False when no slot is
        free now or the adapter is being read from disk."""
        if not req.adapter_id or req.request_id in self._lora_pins:
            return True
        self.check_adapter(req.adapter_id)  # NOT_FOUND here too (migration adopts requests directly)
        assert self.lora is not None
        if not self.lora.acquire(req.adapter_id):
            return False
        self._lora_pins[req.request_id] = req.adapter_id
        return True

    def _lora_unpin(self, request_id: str) -> None:
        name = self._lora_pins.pop(request_id, None)
        if name is not None and self.lora is not None:
            self.lora.release(name)

    def _admit_lora_waiting(self) -> list[RequestOutput]:
        """Hand waiting adapter requests to the scheduler, in arrival order, while slots allow.
        A request whose adapter can no longer be read (its files changed since registration) is
        finished as aborted (its output returned here; the error is logged), nothing else is."""
        failed: list[RequestOutput] = []
        for rid, req in list(self._lora_waiting.items()):
            try:
                if not self._lora_pin(req):
                    continue
            except PdserveError as e:
                log.error("request %s aborted: %s", rid, e)
                del self._lora_waiting[rid]
                req.status, req.finish_reason = RequestStatus.FINISHED_ABORTED, FinishReason.ABORT
                failed.append(self._emit(self._tracked[rid], True))
                continue
            del self._lora_waiting[rid]
            self.scheduler.add_request(req)  # validated when it arrived
        return failed

    def _track(self, req: Request, pin: bool = True) -> _Tracked:
        """Track a request's outputs; ``pin``: pin its adapter's slot first (ResourceExhaustedError
        when none is free)."""
        if pin and not self._lora_pin(req):
            raise ResourceExhaustedError(
                f"no LoRA slot is free for adapter {req.adapter_id!r} now (all {self.lora.config.max_loras} "
                "in use by running requests)",
                retry_after_s=0.05,
            )
        p = req.sampling_params
        self.runner.seeds[req.request_id] = p.seed if p.seed is not None else self._rng.getrandbits(63)
        detok = IncrementalDetokenizer(self.tokenizer, p.stop) if self.tokenizer else None
        tr = _Tracked(req, detok, RequestMetrics(req.arrival_time))
        self._tracked[req.request_id] = tr
        return tr

    def add_request(
        self,
        request_id: str | None,
        prompt: str | Sequence[int] | None,
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
        adapter_id: str = "",
        cache_salt: str = "",
        prefill_only: bool = False,
    ) -> str:
        """Queue a request; returns its id. Raises InvalidRequestError on bad input."""
        req = self._make_request(
            request_id, prompt, params, priority, arrival_time, adapter_id, cache_salt, prefill_only
        )
        if params is not None and params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer")
        if req.sampling_params.num_candidates > 1:
            return self._add_group(req)
        if self._lora_pin(req):
            try:
                self.scheduler.add_request(req)
            except BaseException:
                self._lora_unpin(req.request_id)
                raise
        else:
            # no slot for its adapter now: validate it as the scheduler would (add, then take it
            # back out), and let it wait outside the scheduler until a slot frees up
            self.scheduler.add_request(req)
            self.scheduler.abort_request(req.request_id)
            req.status, req.finish_reason = RequestStatus.WAITING, None
            self._lora_waiting[req.request_id] = req
        self._track(req, pin=False)
        return req.request_id

    # ------------------------------------------------------------------ parallel sampling
    def _add_group(self, req: Request) -> str:
        """Queue a parallel-sampling request (``n``/``best_of`` > 1; see engine.parallel_sampling):
        its parent prefills ``prompt[:-1]`` once; :meth:`_fork` starts the choices."""
        p = req.sampling_params
        name = f"n={p.n}, best_of={p.best_of}"
        if req.prefill_only:
            raise InvalidRequestError(
                f"{name} is not supported for a prefill-only (disaggregated) request yet: send n=1"
            )
        if req.adapter_id:
            raise InvalidRequestError(f"{name} is not supported with a LoRA adapter yet: send n=1")
        if self.kv.sliding_window is not None:
            raise InvalidRequestError(f"{name} is not supported for a sliding-window model yet: send n=1")
        base = p.seed if p.seed is not None else self._rng.getrandbits(62)
        g = SampleGroup(req.request_id, p, base)
        # each choice alone must fit the pool: validate one as the scheduler would, then take it back
        probe = replace(req, request_id=g.child_id(0), sampling_params=g.child_params(0), block_hashes=[])
        self.scheduler.add_request(probe)
        self.scheduler.abort_request(probe.request_id)
        ids = list(req.prompt_token_ids)
        live = {g.child_id(i) for i in range(g.num_candidates)}
        self._groups[req.request_id] = g
        self._group_state[req.request_id] = (req, live)
        if len(ids) == 1:  # nothing to share: the choices prefill their one token each
            self._fork(g, None)
            return req.request_id
        parent = replace(
            req,
            request_id=g.parent_id,
            prompt_token_ids=ids[:-1],
            sampling_params=g.parent_params(),
            prefill_only=True,
            block_hashes=[],
            output_token_ids=[],
        )
        self.scheduler.add_request(parent)
        self._group_parents[parent.request_id] = g
        self._track(parent)
        return req.request_id

    def _fork(self, g: SampleGroup, parent_tr: _Tracked | None) -> None:
        """Start the group's choices: sharing the prefilled parent's blocks (``parent_tr``), or
        unforked (one-token prompt, ``None``); then release the parent."""
        tmpl, _ = self._group_state[g.request_id]
        parent = parent_tr.req if parent_tr is not None else None
        for i in range(g.num_candidates):
            child = Request(
                request_id=g.child_id(i),
                prompt_token_ids=tmpl.prompt_token_ids,
                sampling_params=g.child_params(i),
                arrival_time=tmpl.arrival_time,
                priority=tmpl.priority,
                eos_token_ids=tmpl.eos_token_ids,
                cache_salt=tmpl.cache_salt,
            )
            if parent is None:
                self.scheduler.add_request(child)
            else:
                child.num_computed_tokens = parent.num_computed_tokens
                child.num_cached_tokens = max(parent.num_cached_tokens, 0)
                # the parent's hashes of full prompt blocks only (its discarded token is no prompt)
                child.block_hashes = list(
                    parent.block_hashes[: parent.num_computed_tokens // self.kv.block_size]
                )
                self.kv.fork(parent.request_id, child)
                self.scheduler.add_running(child)
            tr = self._track(child)
            tr.group, tr.choice = g, i
            if parent_tr is not None:
                tr.metrics.first_scheduled_time = parent_tr.metrics.first_scheduled_time
        g.forked = True
        if parent is not None:
            self._group_parents.pop(parent.request_id, None)
            self._forget(parent.request_id)
            self.scheduler.release_prefilled(parent.request_id)

    def _group_output(self, tr: _Tracked, out: RequestOutput) -> list[RequestOutput]:
        g = tr.group
        assert g is not None
        outs = g.on_output(tr.choice, out)
        if out.finished:
            state = self._group_state.get(g.request_id)
            if state is not None:
                state[1].discard(tr.req.request_id)
                if not state[1]:
                    self._drop_group(g.request_id)
        return outs

    def _drop_group(self, request_id: str) -> None:
        g = self._groups.pop(request_id, None)
        self._group_state.pop(request_id, None)
        if g is not None:
            self._group_parents.pop(g.parent_id, None)

    def _abort_group(self, request_id: str) -> None:
        g = self._groups[request_id]
        for rid in [g.parent_id] + [g.child_id(i) for i in range(g.num_candidates)]:
            if rid in self._tracked:
                self.scheduler.abort_request(rid)
                self._forget(rid)
        self._drop_group(request_id)

    def _copy_on_write(self, sched: SchedulerOutput) -> None:
        """Copy the step's copy-on-write blocks: after its swap-outs (done here first: a released
        block being copied out may be a destination), before its swap-ins (a source released by
        a swap-out may be a swap-in's destination) and forward pass."""
        if sched.swap_out:
            self.runner.swap(SchedulerOutput(swap_out=sched.swap_out))
            sched.swap_out = []
        src = [a for a, _ in sched.copy_blocks]
        dst = [b for _, b in sched.copy_blocks]
        self.runner.import_blocks(dst, self.runner.export_blocks(src))

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (a parallel-sampling request: every choice).
        Unknown ids raise RequestNotFoundError."""
        if request_id in self._groups:
            self._abort_group(request_id)
            return
        if is_internal_id(request_id):
            raise RequestNotFoundError(f"no request with id {request_id!r}")
        if request_id in self._prefilled:
            self.release(request_id)
            return
        if request_id not in self._tracked:
            raise RequestNotFoundError(f"no request with id {request_id!r}")
        if self._lora_waiting.pop(request_id, None) is None:
            self.scheduler.abort_request(request_id)
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)
        self.runner.seeds.pop(request_id, None)
        if self.draft is not None:
            self.draft.release(request_id)
        self._lora_unpin(request_id)

    def take_detokenizer(self, request_id: str) -> IncrementalDetokenizer | None:
        """Hand request ``request_id``'s detokenizer to the caller, who renders its text from now
        on, off the engine thread (vLLM v1's split: the engine emits token ids, the front end
        detokenizes; #12). Its later outputs carry ``text_delta == text == ""``; the caller feeds
        each of them, in order, to :class:`engine.detokenizer.OutputText` over the returned
        detokenizer, which gives the text :meth:`_emit` would have. None, and nothing changes,
        when the engine must keep it: a request with stop strings (its output is cut at them
        here), a parallel-sampling choice or parent, a request not tracked (unknown, finished),
        or no tokenizer."""
        tr = self._tracked.get(request_id)
        if tr is None or tr.detok is None or tr.detok.stop or tr.group is not None:
            return None
        if request_id in self._group_parents:
            return None
        detok, tr.detok = tr.detok, None
        return detok

    def has_request(self, request_id: str) -> bool:
        return request_id in self._groups or (request_id in self._tracked and not is_internal_id(request_id))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._lora_waiting)

    @property
    def num_lora_waiting(self) -> int:
        """Admitted requests waiting outside the scheduler for their adapter to take a slot."""
        return len(self._lora_waiting)

    # ------------------------------------------------------------------ loop
    def step(self) -> list[RequestOutput]:
        failed = self._admit_lora_waiting() if self._lora_waiting else []
        if self.draft is not None:  # draft every running decode in one batch (the drafter reuses them)
            self.draft.prepare(r for r in self.scheduler.running if r.status is RequestStatus.RUNNING)
        sched = self.scheduler.schedule()
        if sched.disk_out:
            self._disk_write(sched)  # before the swap-outs reuse the spilled host slots
        if sched.is_empty:
            self.runner.swap(sched)  # a step that only swapped out still copies
            if sched.prefetch_in:
                self.runner.swap(SchedulerOutput(swap_in=sched.prefetch_in))
            if sched.disk_in:
                self._disk_read(sched)
            if self._lora_waiting and self.lora is not None:
                self.lora.wait_for_loads(0.01)  # only adapter reads are pending: do not spin
            return failed
        if sched.copy_blocks:
            self._copy_on_write(sched)
        now = self.clock()
        prefill_tokens = step_decodes = 0
        for s in sched.scheduled:
            tr = self._tracked[s.request.request_id]
            if tr.metrics.first_scheduled_time is None:
                tr.metrics.first_scheduled_time = now
            if s.request.is_decoding:
                self.decode_tokens += 1
                step_decodes += s.num_new_tokens  # with speculation: 1 + its drafts, all computed
            else:
                prefill_tokens += s.num_new_tokens
        self.prefill_tokens_computed += prefill_tokens
        t0 = self.clock()  # the rates are measured on the engine's clock (bench/mlfq_jct.py: CPU time)
        if self.lora is not None:
            self.lora.begin_step(sched.scheduled)
            try:
                results = self.runner.execute(sched)
            finally:
                self.lora.end_step()
        else:
            results = self.runner.execute(sched)
        if sched.prefetch_in:
            # swap-in prefetch, after the forward pass (its destinations were free blocks): on
            # CUDA queued on the side stream while the host plans the next step, whose forward
            # waits for it
            self.runner.swap(SchedulerOutput(swap_in=sched.prefetch_in))
        if sched.disk_in:
            self._disk_read(sched)  # after the swap-ins read the host slots it refills
        self._observe_step(sched, prefill_tokens, step_decodes, self.clock() - t0)
        self.num_steps += 1
        finished = self.scheduler.update_from_output(sched, self._verified(sched, results))
        if self.draft is not None:  # free the draft KV of finished, preempted and swapped requests
            self.draft.retain(
                {r.request_id for r in self.scheduler.running if r.status is RequestStatus.RUNNING}
            )
        finished_ids = {r.request_id for r in finished}
        now = self.clock()
        outputs: list[RequestOutput] = failed
        for s in sched.scheduled:
            req = s.request
            rid = req.request_id
            if rid not in results or rid not in self._tracked:
                continue
            tr = self._tracked[rid]
            g = self._group_parents.get(rid)
            if g is not None:  # a parallel-sampling parent: its token is discarded
                if rid in finished_ids:
                    self._fork(g, tr)
                continue
            res = results[rid]
            # a speculative decode: the results of the tokens the scheduler kept (a stop cuts the run)
            step_res = (
                res[: len(req.output_token_ids) - tr.emitted_tokens] if isinstance(res, list) else [res]
            )
            if tr.metrics.first_token_time is None:
                tr.metrics.first_token_time = now
                self.prefill_tokens_reused += max(req.num_cached_tokens, 0)
            for r in step_res:
                tr.metrics.token_times.append(now)
                if r.logprob is not None:
                    tr.logprobs.append(TokenLogprob(r.token, r.logprob, r.top_logprobs or []))
            o = self._emit(tr, rid in finished_ids)
            if isinstance(res, list) and len(o.new_token_ids) > 1:
                # a speculative decode step: the drafts it kept are decode tokens too (the step
                # itself was counted once when scheduled; a stop inside the run is already cut)
                self.decode_tokens += len(o.new_token_ids) - 1
            if tr.group is None:
                outputs.append(o)
            else:
                outputs.extend(self._group_output(tr, o))
        return outputs

    def _verified(
        self, sched: SchedulerOutput, results: dict[str, SampleResult | list[SampleResult]]
    ) -> dict[str, int | tuple[int, ...]]:
        """What each sampling request's step emits: its token, or for a speculative decode the
        run :func:`engine.spec_decode.verify` keeps (the agreeing drafts plus the target's next
        token; ``results`` is cut to that run)."""
        out: dict[str, int | tuple[int, ...]] = {}
        for s in sched.scheduled:
            rid = s.request.request_id
            res = results.get(rid)
            if res is None:
                continue
            if not isinstance(res, list):
                out[rid] = res.token
                continue
            v = verify(s.spec_token_ids, [r.token for r in res])
            self.spec_draft_tokens += v.drafted
            self.spec_accepted_tokens += v.accepted
            results[rid] = res[: len(v.tokens)]
            out[rid] = v.tokens
        return out

    def _detok_run(self, tr: _Tracked, new: list[int], finished: bool) -> tuple[str, str | None, list[int]]:
        """Detokenize a step's several new tokens (speculative decoding) one at a time, as plain
        decoding would have: a stop string completed by one of them drops the tokens after it
        (with their log-probs and times) and finishes the request with that stop string."""
        req = tr.req
        assert tr.detok is not None
        delta = ""
        for j, t in enumerate(new):
            last = j == len(new) - 1
            visible = [] if (finished and last and req.stop_reason == t) else [t]
            d, matched = tr.detok.add(visible, final=finished and last)
            delta += d
            if matched is None:
                continue
            cut = len(new) - 1 - j
            if cut:
                del req.output_token_ids[-cut:]
                del tr.metrics.token_times[-cut:]
                if req.sampling_params.logprobs is not None:
                    del tr.logprobs[-cut:]
                tr.emitted_tokens = len(req.output_token_ids)
            if finished and not last:  # the scheduler ended it at a later token: the stop string was first
                req.stop_reason, req.finish_reason = matched, FinishReason.STOP
                req.status = RequestStatus.FINISHED_STOPPED
            return delta, matched, new[: j + 1]
        return delta, None, new

    def _emit(self, tr: _Tracked, finished: bool) -> RequestOutput:
        req = tr.req
        new = req.output_token_ids[tr.emitted_tokens :]
        tr.emitted_tokens = len(req.output_token_ids)
        delta = ""
        if tr.detok is not None and len(new) > 1 and self.config.speculative is not None:
            delta, matched, new = self._detok_run(tr, new, finished)
            if matched is not None and not finished:
                self.scheduler.finish_request(req.request_id, FinishReason.STOP, matched)
                finished = True
                delta += tr.detok.add([], final=True)[0]
        elif tr.detok is not None:
            # eos / stop token ids are not rendered as text
            visible = [t for t in new if not (finished and req.stop_reason == t)]
            delta, matched = tr.detok.add(visible, final=finished)
            if matched is not None and not finished:
                self.scheduler.finish_request(req.request_id, FinishReason.STOP, matched)
                finished = True
                delta += tr.detok.add([], final=True)[0]
        if finished:
            tr.metrics.finished_time = self.clock()
            if req.status is RequestStatus.PREFILLED:
                self._prefilled[req.request_id] = tr
                self._tracked.pop(req.request_id, None)
                self._lora_unpin(req.request_id)
            else:
                self._forget(req.request_id)
        return RequestOutput(
            request_id=req.request_id if tr.group is None else tr.group.request_id,
            new_token_ids=new,
            token_ids=list(req.output_token_ids),
            text_delta=delta,
            text=tr.detok.text if tr.detok else "",
            finished=finished,
            finish_reason=req.finish_reason if finished else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            logprobs=tr.logprobs[-len(new) :] if (tr.logprobs and new) else [],
            metrics=tr.metrics,
            stop_reason=req.stop_reason,
            choice_index=tr.choice,
            cumulative_logprob=(
                sum(lp.logprob for lp in tr.logprobs) if req.sampling_params.logprobs is not None else None
            ),
        )

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run prompts to completion (offline batch); results in input order, logprobs cumulative."""
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        for sp in plist:
            if sp is not None and sp.num_candidates > 1:
                raise InvalidRequestError(
                    f"generate returns one output per prompt: n={sp.n}, best_of={sp.best_of} needs "
                    "generate_choices (or add_request and step)"
                )
        ids = [self.add_request(None, p, sp) for p, sp in zip(prompts, plist, strict=True)]
        final: dict[str, RequestOutput] = {}
        lps: dict[str, list[TokenLogprob]] = {i: [] for i in ids}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        while self.has_unfinished():
            for o in self.step():
                lps[o.request_id].extend(o.logprobs)
                if o.finished:
                    o.logprobs = lps[o.request_id]
                    final[o.request_id] = o
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return [final[i] for i in ids]

    def generate_choices(self, prompt: str | Sequence[int], params: SamplingParams) -> list[RequestOutput]:
        """Run one request to completion; its ``n`` final outputs by ``choice_index`` (logprobs
        cumulative). Other queued requests run alongside."""
        rid = self.add_request(None, prompt, params)
        final: dict[int, RequestOutput] = {}
        lps: dict[int, list[TokenLogprob]] = {}
        while len(final) < params.n:
            if not self.has_unfinished():
                raise RuntimeError(f"request {rid} ended with {len(final)} of {params.n} choices")
            for o in self.step():
                if o.request_id != rid:
                    continue
                lps.setdefault(o.choice_index, []).extend(o.logprobs)
                if o.finished:
                    o.logprobs = lps[o.choice_index]
                    final[o.choice_index] = o
        return [final[i] for i in range(params.n)]

    # ------------------------------------------------------------------ prefill role
    def export_kv(self, request_id: str) -> KVExport:
        """KV blocks of a prefilled (``prefill_only``) request. Blocks stay held until ``release``.

        Always the whole prompt's KV, also for a sliding-window model: a prefill-only request
        keeps every block until export (the decode side drops what is out of its window)."""
        tr = self._prefilled.get(request_id)
        if tr is None:
            raise RequestNotFoundError(f"request {request_id!r} has not finished a prefill-only run")
        req = tr.req
        n = req.num_prompt_tokens
        table = self.kv.block_table(request_id)[: self.kv.blocks_needed(n)]
        if NULL_BLOCK in table:
            raise RuntimeError(f"request {request_id!r} lost blocks before export")
        prompt = list(req.prompt_token_ids)
        hashes = chain_hashes(
            prompt, self.kv.block_size, self.model_id, req.adapter_id, req.cache_salt, include_partial=True
        )
        return KVExport(
            request_id=request_id,
            model_id=self.model_id,
            token_ids=prompt,
            first_token=req.output_token_ids[0],
            block_hashes=hashes,
            blocks=self.runner.export_blocks(table),
            shape=self.kv_shape,
            first_logprob=tr.logprobs[0] if tr.logprobs else None,
        )

    def release(self, request_id: str) -> None:
        """Free a prefilled request's blocks (full blocks stay in the prefix cache)."""
        if self._prefilled.pop(request_id, None) is None:
            raise RequestNotFoundError(f"request {request_id!r} holds no exported KV")
        self.scheduler.release_prefilled(request_id)
        self.runner.seeds.pop(request_id, None)

    def prefix_hashes(
        self, prompt_token_ids: Sequence[int], adapter_id: str = "", cache_salt: str = ""
    ) -> list[BlockHash]:
        """Keys of the prompt's full blocks that a prefix cache could serve (all but the last token)."""
        hashes = chain_hashes(
            list(prompt_token_ids), self.kv.block_size, self.model_id, adapter_id, cache_salt
        )
        return hashes[: (len(prompt_token_ids) - 1) // self.kv.block_size]

    def num_local_prefix_blocks(self, hashes: list[BlockHash]) -> int:
        return self.kv.cached_prefix_len(hashes)

    def insert_prefix_blocks(self, hashes: list[BlockHash], blocks: torch.Tensor) -> int:
        """Put KV blocks fetched from the store into the local prefix cache (see KVCacheManager)."""
        if blocks.shape[0] != len(hashes):
            raise LayoutMismatchError(f"{blocks.shape[0]} blocks for {len(hashes)} hashes")
        return self.kv.insert_cached(hashes, lambda ids: self.runner.import_blocks(ids, blocks[: len(ids)]))

    # ------------------------------------------------------------------ decode role
    def can_admit(self, num_tokens: int, adapter_id: str = "") -> bool:
        """Whether blocks for ``num_tokens`` (+1 to decode into) are free now (with a sliding
        window, only the blocks still inside it are needed) and, with ``adapter_id``, whether its
        LoRA slot can be taken now (an adapter not in host memory starts loading; unknown: False)."""
        if self._import_need(num_tokens) > self.kv.num_free_blocks:
            return False
        if not adapter_id:
            return True
        return self.lora is not None and self.lora.has(adapter_id) and self.lora.ready(adapter_id)

    def check_could_admit(self, num_tokens: int) -> None:
        """InvalidRequestError when :meth:`can_admit` could never say yes for ``num_tokens``, even
        with every block free (waiting for room would only time out as if the worker were busy)."""
        need = self._import_need(num_tokens)
        if need > self.kv.num_blocks:
            raise InvalidRequestError(
                f"prompt of {num_tokens} tokens needs {need} KV blocks, more than this engine has "
                f"({self.kv.num_blocks} x {self.kv.block_size} tokens)"
            )

    def check_group_fits(self, num_prefix_tokens: int, num_candidates: int) -> None:
        """InvalidRequestError when a group of ``num_candidates`` choices over ``num_prefix_tokens``
        handed-off tokens could never be adopted at once (:meth:`group_import_need` beyond the whole
        pool): :meth:`can_admit_group` would never say yes."""
        need = self.group_import_need(num_prefix_tokens, num_candidates)
        if need > self.kv.num_blocks:
            raise InvalidRequestError(
                f"{num_candidates} choices over a {num_prefix_tokens}-token shared prompt need {need} KV "
                f"blocks at once, more than this engine has ({self.kv.num_blocks} x {self.kv.block_size} "
                "tokens): lower n / best_of"
            )

    def _import_need(self, num_tokens: int) -> int:
        return self.kv.blocks_needed(num_tokens + 1) - self.kv.num_skippable_blocks(num_tokens)

    def import_kv(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        first_token: int,
        blocks: torch.Tensor,
        params: SamplingParams,
        *,
        shape: KVShape | None = None,
        model_id: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        first_logprob: TokenLogprob | None = None,
        adapter_id: str = "",
        cache_salt: str = "",
    ) -> str:
        """Adopt a prefilled request: copy its KV in, append its first token, keep decoding.

        ``blocks`` holds the whole prompt's KV; with a sliding window only the blocks still
        inside the window are kept (see ``KVCacheManager.adopt_blocks``). Raises ResourceExhaustedError when the pool lacks blocks (the caller retries later),
        LayoutMismatchError when the KV was made by a different model/layout.
        """
        if params.num_candidates > 1:
            raise InvalidRequestError(
                f"n={params.n}, best_of={params.best_of} is not supported for an imported (disaggregated) "
                "request yet: send n=1"
            )
        if model_id is not None and model_id != self.model_id:
            raise LayoutMismatchError(f"KV made by model {model_id!r}, this engine serves {self.model_id!r}")
        self.check_adapter(adapter_id)
        if shape is not None and shape != self.kv_shape:
            raise LayoutMismatchError(f"KV layout {shape} does not match this engine's {self.kv_shape}")
        req = self._make_request(
            request_id, prompt_token_ids, params, priority, arrival_time, adapter_id, cache_salt, False
        )
        n = req.num_prompt_tokens
        need = self.kv.blocks_needed(n)
        if (
            tuple(blocks.shape[1:])
            != (
                self.kv_shape.num_layers,
                2,
                self.kv.block_size,
                self.kv_shape.num_kv_heads,
                self.kv_shape.head_dim,
            )
            or blocks.shape[0] != need
        ):
            raise LayoutMismatchError(
                f"KV tensor of shape {tuple(blocks.shape)} does not fit {n} tokens in this layout"
            )
        # a request that could not finish here even alone (its prompt plus max_tokens outgrows the
        # pool) is refused now, not after decoding until it runs out and preempts itself
        self.scheduler.check_fits(req)
        if not self.can_admit(n):
            raise ResourceExhaustedError(
                f"decode engine has {self.kv.num_free_blocks} free KV blocks, needs {self._import_need(n)}",
                retry_after_s=0.05,
            )
        if not self._lora_pin(req):  # before any block is taken
            raise ResourceExhaustedError(
                f"no LoRA slot is free for adapter {adapter_id!r} now (all in use by running requests)",
                retry_after_s=0.05,
            )
        skip = self.kv.num_skippable_blocks(n)
        ids = self.kv.adopt_blocks(req, n)
        self.runner.import_blocks(ids, blocks[skip:])
        req.num_computed_tokens = n
        req.num_cached_tokens = 0
        req.output_token_ids.append(int(first_token))
        tr = self._track(req)
        tr.metrics.first_token_time = self.clock()
        tr.metrics.token_times.append(tr.metrics.first_token_time)
        if first_logprob is not None:
            tr.logprobs.append(first_logprob)
        tr.emitted_tokens = 1
        if tr.detok is not None:
            tr.detok.add([int(first_token)])
        stop = self.scheduler.check_stop(req, int(first_token))
        self.scheduler.add_running(req)
        self.kv.cache_blocks(req)
        if stop is not None:
            self.scheduler.finish_request(req.request_id, stop)
            self._forget(req.request_id)
        return req.request_id

    def group_import_need(self, num_prefix_tokens: int, num_candidates: int) -> int:
        """Blocks :meth:`import_kv_group` takes at once for a prefix of ``num_prefix_tokens``
        and ``num_candidates`` choices: the prefix's blocks, shared, plus one per choice (its copy
        of the shared partial block, or the block its last prompt token opens)."""
        return group_import_blocks(num_prefix_tokens, num_candidates, self.kv.block_size)

    def can_admit_group(self, num_prefix_tokens: int, num_candidates: int) -> bool:
        """Whether :meth:`group_import_need` blocks are free now."""
        return self.group_import_need(num_prefix_tokens, num_candidates) <= self.kv.num_free_blocks

    def import_kv_group(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        blocks: torch.Tensor,
        params: SamplingParams,
        *,
        shape: KVShape | None = None,
        model_id: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str = "",
    ) -> str:
        """Adopt a parallel-sampling request (``params.num_candidates > 1``) prefilled elsewhere:
        ``blocks`` hold the KV of every prompt token but the last (the prefill worker's
        ``prompt_tail_pending`` handoff). The choices are forked over those blocks, sharing them
        by reference count, and each computes the last prompt token itself, exactly as the whole
        engine's :meth:`add_request` does after its own prefill of ``prompt[:-1]``, so choice
        ``i`` equals the request run alone with ``n=1`` and seed ``seed + i`` (the engine picks
        a random base seed when ``params.seed`` is None). Outputs carry ``request_id`` and
        ``choice_index``; :meth:`abort` frees every choice. Raises InvalidRequestError for
        ``n == 1``, a prompt under two tokens, LoRA or a sliding window (as add_request), or a
        group that could never be adopted at once (:meth:`check_group_fits`),
        ResourceExhaustedError when :meth:`can_admit_group` is False, LayoutMismatchError for KV
        of another model/layout or of the wrong size."""
        if params.num_candidates < 2:
            raise InvalidRequestError("import_kv_group is for n > 1 or best_of > 1: use import_kv")
        if model_id is not None and model_id != self.model_id:
            raise LayoutMismatchError(f"KV made by model {model_id!r}, this engine serves {self.model_id!r}")
        if shape is not None and shape != self.kv_shape:
            raise LayoutMismatchError(f"KV layout {shape} does not match this engine's {self.kv_shape}")
        req = self._make_request(
            request_id, prompt_token_ids, params, priority, arrival_time, "", cache_salt, False
        )
        ids = list(req.prompt_token_ids)
        n = len(ids) - 1
        if n < 1:
            raise InvalidRequestError(
                "a parallel-sampling handoff needs a prompt of at least 2 tokens (a 1-token prompt has "
                "no KV to share: run it with local_prefill)"
            )
        if self.kv.sliding_window is not None:
            raise InvalidRequestError(
                f"n={params.n}, best_of={params.best_of} is not supported for a sliding-window model yet: send n=1"
            )
        want = (
            self.kv_shape.num_layers,
            2,
            self.kv.block_size,
            self.kv_shape.num_kv_heads,
            self.kv_shape.head_dim,
        )
        if tuple(blocks.shape[1:]) != want or blocks.shape[0] != self.kv.blocks_needed(n):
            raise LayoutMismatchError(
                f"KV tensor of shape {tuple(blocks.shape)} does not fit {n} tokens in this layout"
            )
        self.check_group_fits(n, params.num_candidates)  # never admissible: refused, not retried
        if not self.can_admit_group(n, params.num_candidates):
            raise ResourceExhaustedError(
                f"decode engine has {self.kv.num_free_blocks} free KV blocks, needs "
                f"{self.group_import_need(n, params.num_candidates)}",
                retry_after_s=0.05,
            )
        base = params.seed if params.seed is not None else self._rng.getrandbits(62)
        g = SampleGroup(req.request_id, params, base)
        probe = replace(req, request_id=g.child_id(0), sampling_params=g.child_params(0), block_hashes=[])
        self.scheduler.check_admissible(probe)  # each choice alone must fit, as add_request checks
        parent = replace(
            req,
            request_id=g.parent_id,
            prompt_token_ids=ids[:-1],
            sampling_params=g.parent_params(),
            prefill_only=True,
            block_hashes=[],
            output_token_ids=[],
        )
        table = self.kv.adopt_blocks(parent, n)
        self.runner.import_blocks(table, blocks)
        parent.num_computed_tokens = n
        parent.num_cached_tokens = 0
        self.kv.cache_blocks(parent)  # its full blocks join the prefix cache (and get their keys)
        self._groups[req.request_id] = g
        self._group_state[req.request_id] = (req, {g.child_id(i) for i in range(g.num_candidates)})
        self._fork(g, self._track(parent, pin=False))
        return req.request_id

    # ------------------------------------------------------------------ stats
    def stats(self) -> EngineStats:
        dts = self.disk_tier.stats if self.disk_tier is not None else None
        return EngineStats(
            num_waiting=self.scheduler.num_waiting + len(self._lora_waiting),
            num_running=self.scheduler.num_running,
            kv_blocks_total=self.kv.num_blocks,
            kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_cached=self.kv.pool.num_cached_blocks,
            block_size=self.kv.block_size,
            token_budget=self.config.max_num_batched_tokens,
            prefill_tokens_computed=self.prefill_tokens_computed,
            prefill_tokens_reused=self.prefill_tokens_reused,
            decode_tokens=self.decode_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            num_swapped=self.scheduler.num_swapped,
            num_swap_outs=self.scheduler.num_swap_outs,
            num_swap_ins=self.scheduler.num_swap_ins,
            swapped_out_blocks=self.kv.swap_stats.blocks_out,
            swapped_in_blocks=self.kv.swap_stats.blocks_in,
            host_blocks_total=self.kv.num_host_blocks,
            host_blocks_used=self.kv.num_host_blocks - self.kv.num_free_host_blocks,
            disk_blocks_total=self.kv.num_disk_blocks,
            disk_blocks_used=self.kv.num_disk_blocks - self.kv.num_free_disk_blocks,
            disk_spills=self.scheduler.num_spills,
            disk_promotions=self.scheduler.num_disk_promotions,
            disk_spilled_blocks=self.kv.swap_stats.blocks_spilled,
            disk_promoted_blocks=self.kv.swap_stats.blocks_promoted,
            disk_full=self.scheduler.num_disk_full,
            disk_fallbacks=self.scheduler.num_disk_fallbacks,
            disk_write_errors=dts.write_errors if dts is not None else 0,
            disk_corrupt_blocks=dts.corrupt_blocks if dts is not None else 0,
            disk_seconds=dts.seconds if dts is not None else 0.0,
            disk_enabled=self.disk_tier is not None and self.scheduler.disk_enabled,
            swap_prefetches=self.scheduler.num_prefetches,
            swap_prefetch_evictions=self.scheduler.num_prefetch_evictions,
            spec_draft_tokens=self.spec_draft_tokens,
            spec_accepted_tokens=self.spec_accepted_tokens,
        )
