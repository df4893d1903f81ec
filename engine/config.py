"""Engine configuration (frozen)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.scheduler import SchedulingPolicy
from engine.spec_decode.config import SpeculativeConfig

WEIGHT_DTYPES = ("float32", "int8", "bfloat16")  # engine.models.quant.WeightDType values
LINEAR_BACKENDS = ("auto", "torch", "native")  # engine.models.linear_native.LinearBackend values


@dataclass(frozen=True)
class EngineConfig:
    """How an engine instance runs.

    The KV pool holds ``num_kv_blocks`` blocks of ``block_size`` tokens; when None it is sized
    from ``kv_cache_memory_bytes``. ``max_model_len`` None means the model's
    ``max_position_embeddings``. ``dtype='auto'`` is float32 on CPU, the checkpoint's dtype on CUDA.
    ``tensor_parallel_size`` > 1 splits the model over that many processes (``cuda:0..tp-1`` on
    GPU, CPU cores on CPU; :mod:`engine.tp_runner`); each rank's KV cache holds ``1/tp`` of the
    heads, so ``kv_cache_memory_bytes`` (per rank) buys ``tp`` times the blocks.

    ``swap_space_bytes`` (vLLM's ``--swap-space``) sizes a host-memory KV block pool behind the
    device pool: a preempted request's KV is swapped there instead of recomputed when that is
    cheaper (:mod:`engine.swap_policy`). 0 (default): recompute only. It must hold at least one
    block (checked when the engine is built, which knows a block's size); not supported with
    ``tensor_parallel_size`` > 1.

    ``swap_disk_bytes`` (cold KV on disk, :mod:`engine.kv_disk`): a local-disk tier behind the
    host pool, in preallocated segment files under ``swap_disk_dir`` (None: the system's temp
    folder). When the host pool is full, the swapped-out KV of the coldest requests spills there
    instead of the new victim recomputing, when the cost model (measured disk bandwidth) says so;
    it is read back to the host before the request runs (checksummed: a corrupt or unreadable
    block, a failed write, make that request recompute; a write error turns spilling off). 0
    (default): no disk tier. Needs ``swap_space_bytes`` > 0; at least one block (checked at
    build); a directory that cannot hold it is refused at build.

    ``swap_prefetch`` (with a host pool): swapped-out requests next in queue order are swapped
    back in one step ahead of their turn when seats and free blocks allow (on CUDA the copy runs
    on the side stream while the host plans the next step); see :mod:`engine.scheduler`.

    ``weight_dtype``: how the projections and lm_head are stored (:mod:`engine.models.quant`):
    ``float32`` (as loaded), ``int8`` (weight-only, one scale per output row; fp32 CPU models, not
    MoE, not with tensor parallelism or LoRA), ``bfloat16`` (bf16 weights, activations rounded to bf16 at
    each projection; only where the CPU has native bf16, with int8's restrictions).
    Refused at load, naming why, where it cannot run.

    ``linear`` (:mod:`engine.models.linear_native`): ``torch`` (``F.linear``), ``native`` (a C
    kernel for fp32 CPU projections of up to 8 rows; refused on CUDA, non-fp32, MoE, with tensor
    parallelism, weight offloading or a ``weight_dtype`` other than float32; with LoRA the base
    projections take it), ``auto`` (native where it applies, else torch); None (default): env
    ``PDSERVE_LINEAR``, else auto.

    ``weight_memory_budget_bytes`` (FlexGen-style weight offloading, :mod:`engine.offload_policy`
    and :mod:`engine.offload`): the device memory the weights may use. None (default): every
    weight stays on the device. A budget below the weights' size keeps the non-layer weights, two
    layer buffers and as many decoder layers as fit on the device; the other layers live in host
    memory (up to ``weight_host_budget_bytes``; None: no limit) and beyond that in one scratch
    file under ``weight_offload_dir`` (None: the system's temp folder), each copied in ahead of the
    layer that needs it. Output is identical to the resident model. Refused with tensor
    parallelism, a ``weight_dtype`` other than float32, and (at load) LoRA adapters; a budget
    below the minimum is refused at load naming the minimum.

    ``offline_batch`` (an offline throughput job over offloaded weights, FlexGen's large batch):
    ``max_num_seqs`` becomes the batch size the offload cost model picks
    (:func:`engine.offload.offline_batch_size`: the smallest batch reaching 90% of the predicted
    throughput at the bound), with the given ``max_num_seqs`` and the KV pool's block count as
    the bound; the choice and its predicted step time are logged and kept as
    ``LLMEngine.offline_batch``. Needs weight offloading (``weight_memory_budget_bytes``);
    refused with ``scheduling_policy`` MLFQ (an interactive policy) and with ``speculative``.

    ``kv_memory_budget_bytes`` (FlexGen's KV offloading, :mod:`engine.kv_offload` and
    :func:`engine.offload_policy.place_kv`): the device memory the KV pool may use. None
    (default): the whole pool is on the device. A budget below the pool keeps the KV of as many
    decoder layers as fit (less two staging buffers) on the device and the KV of the other
    layers, of every running request, off it: in a host-memory pool, up to
    ``kv_host_budget_bytes`` (None: no limit), and beyond that in a disk-backed pool (a
    memory-mapped scratch file under ``kv_offload_dir``; None: the system's temp folder). Before
    such a layer runs, the blocks the step's requests use are copied into a staging buffer (the
    next one while the current layer computes) and the step's new K/V rows are written back
    after it. A staging buffer holds the most blocks a step can use (``max_num_seqs`` sequences
    of ``max_model_len`` tokens; at most the pool). Output is identical to the resident pool.
    The minimum is two staging buffers (refused below it, naming it). Refused with tensor
    parallelism and ``cuda_graph``; ``kv_host_budget_bytes`` / ``kv_offload_dir`` need
    ``kv_memory_budget_bytes`` or ``device_memory_budget_bytes``.

    ``device_memory_budget_bytes`` (weights and KV together): the device memory the weights and the
    KV pool may use between them; the split is the offload cost model's
    (:func:`engine.offload_policy.split_device_budget`: every count of offloaded KV layers with the
    weights placed in the rest, the smallest predicted decode step wins, the KV priced for a step
    filling the KV staging buffers and decoding ``max_num_seqs`` tokens, rates measured at load). The
    engine then runs as with the two budgets it chose (``LLMEngine.memory_split``). Refused
    together with ``weight_memory_budget_bytes`` or ``kv_memory_budget_bytes`` (set one or the
    other), and where either offloading is refused.

    ``speculative`` (vLLM's ``speculative_config``; :mod:`engine.spec_decode`): None (default),
    no speculation; a :class:`~engine.spec_decode.SpeculativeConfig` with ``SpecMethod.NGRAM``
    drafts up to ``num_speculative_tokens`` tokens per decoding request by prompt lookup and
    verifies them in the same forward pass; output (tokens, log-probs) is the non-speculative
    output. ``SpecMethod.DRAFT_MODEL`` drafts with a small model of the same vocabulary
    (:mod:`engine.spec_decode.draft_model`; greedy and, with the default coupled acceptance,
    seeded output is the non-speculative output; ``DraftAcceptance.REJECTION`` keeps the
    target's distribution instead). Refused with tensor parallelism; at engine build, with LoRA
    adapters and with a model whose every layer has a sliding window.

    ``attention_backend`` (:mod:`engine.attention_backends`): the decode attention kernel,
    ``auto`` | ``native`` | ``gather`` | ``torch_paged`` | ``flashinfer`` | ``flash_attn``; None
    (default): the ``PDSERVE_ATTENTION`` environment variable, else ``auto`` (native C kernel on
    fp32 CPU, else gather). A backend named explicitly that cannot run is refused when the engine
    is built, naming it; never replaced. Not with tensor parallelism (use the variable there).

    ``cuda_graph`` (:mod:`engine.attention_graphs`): replay decode-only steps of up to
    ``cuda_graph_max_batch_size`` rows from CUDA graphs captured per batch-size bucket. Needs
    ``device='cuda'`` and ``attention_backend='torch_paged'``; refused with tensor parallelism,
    weight offloading and (at engine build) LoRA adapters.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 512 * 1024 * 1024
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    long_prefill_token_threshold: int = 512
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    scheduling_policy: SchedulingPolicy = SchedulingPolicy.PRIORITY
    max_model_len: int | None = None
    dtype: str = "auto"
    device: str = "cpu"
    model_id: str | None = None
    seed: int = 0
    tensor_parallel_size: int = 1
    swap_space_bytes: int = 0
    swap_disk_bytes: int = 0
    swap_disk_dir: str | None = None
    swap_prefetch: bool = True
    weight_dtype: str = "float32"
    linear: str | None = None
    weight_memory_budget_bytes: int | None = None
    weight_host_budget_bytes: int | None = None
    weight_offload_dir: str | None = None
    offline_batch: bool = False
    kv_memory_budget_bytes: int | None = None
    kv_host_budget_bytes: int | None = None
    kv_offload_dir: str | None = None
    device_memory_budget_bytes: int | None = None
    speculative: SpeculativeConfig | None = None
    # SchedulingPolicy.MLFQ only (see engine.mlfq; validated by SchedulerConfig)
    mlfq_num_levels: int = 4
    mlfq_quantum_iters: int = 8
    mlfq_base_prefill_s: float = 0.05
    mlfq_starvation_s: float = 10.0
    mlfq_swap_watermark: float = 1.0
    mlfq_swap_backoff_iters: int = 256
    mlfq_swap_backoff_max_iters: int = 512
    # a queued MLFQ request preempts a lower level only after waiting this many iterations (>= 0)
    mlfq_preempt_wait_iters: int = 8
    attention_backend: str | None = None
    cuda_graph: bool = False
    cuda_graph_max_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(
                "long_prefill_token_threshold (the prefill chunk) must be >= 0 (0: only the step's token "
                f"budget bounds a chunk), got {self.long_prefill_token_threshold}"
            )
        if isinstance(self.swap_space_bytes, bool) or not isinstance(self.swap_space_bytes, int):
            raise ValueError(f"swap_space_bytes must be an integer, got {self.swap_space_bytes!r}")
        if self.swap_space_bytes < 0:
            raise ValueError(
                f"swap_space_bytes must be >= 0 (0: recompute only), got {self.swap_space_bytes}"
            )
        if isinstance(self.swap_disk_bytes, bool) or not isinstance(self.swap_disk_bytes, int):
            raise ValueError(f"swap_disk_bytes must be an integer, got {self.swap_disk_bytes!r}")
        if (
            isinstance(self.mlfq_preempt_wait_iters, bool)
            or not isinstance(self.mlfq_preempt_wait_iters, int)
            or self.mlfq_preempt_wait_iters < 0
        ):
            raise ValueError(
                f"mlfq_preempt_wait_iters must be an integer >= 0, got {self.mlfq_preempt_wait_iters!r}"
            )
        if self.swap_disk_bytes < 0:
            raise ValueError(f"swap_disk_bytes must be >= 0 (0: no disk tier), got {self.swap_disk_bytes}")
        if self.swap_disk_bytes and not self.swap_space_bytes:
            raise ValueError(
                "swap_disk_bytes > 0 needs a host swap pool (the disk tier sits behind it): set swap_space_bytes"
            )
        if self.swap_disk_dir is not None and not self.swap_disk_bytes:
            raise ValueError("swap_disk_dir needs a disk tier: set swap_disk_bytes > 0")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {self.weight_dtype!r}")
        if self.linear is not None and self.linear not in LINEAR_BACKENDS:
            raise ValueError(f"linear must be one of {list(LINEAR_BACKENDS)} or None, got {self.linear!r}")
        if self.linear == "native" and (
            self.tensor_parallel_size > 1
            or self.weight_dtype != "float32"
            or self.weight_memory_budget_bytes is not None
            or self.device_memory_budget_bytes is not None
        ):
            raise ValueError(
                "linear 'native' needs tensor_parallel_size 1, weight_dtype float32 and no weight offloading"
            )
        if self.weight_dtype != "float32" and self.tensor_parallel_size > 1:
            raise ValueError(
                f"weight_dtype {self.weight_dtype!r} is not supported with tensor_parallel_size > 1: "
                "use weight_dtype='float32'"
            )
        if self.swap_space_bytes and self.tensor_parallel_size > 1:
            raise ValueError(
                "swap_space_bytes > 0 is not supported with tensor_parallel_size > 1 "
                "(the followers' KV shards have no host pool): set swap_space_bytes=0"
            )
        for name in ("weight_memory_budget_bytes", "weight_host_budget_bytes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be an integer >= 0 or None, got {v!r}")
        if (
            self.weight_memory_budget_bytes is None
            and self.device_memory_budget_bytes is None
            and (self.weight_host_budget_bytes is not None or self.weight_offload_dir is not None)
        ):
            raise ValueError(
                "weight_host_budget_bytes / weight_offload_dir need weight offloading: "
                "set weight_memory_budget_bytes"
            )
        if self.weight_memory_budget_bytes is not None:
            if self.tensor_parallel_size > 1:
                raise ValueError(
                    "weight offloading (weight_memory_budget_bytes) is not supported with "
                    "tensor_parallel_size > 1: set one of them"
                )
            if self.weight_dtype != "float32":
                raise ValueError(
                    f"weight offloading (weight_memory_budget_bytes) is not supported with weight_dtype "
                    f"{self.weight_dtype!r} (the int8 path keeps a float32 copy of each projection on the "
                    "device): use weight_dtype='float32'"
                )
        self._check_offload_extras()
        if self.speculative is not None:
            if not isinstance(self.speculative, SpeculativeConfig):
                raise ValueError(f"speculative must be a SpeculativeConfig or None, got {self.speculative!r}")
            if self.tensor_parallel_size > 1:
                raise ValueError(
                    "speculative decoding is not supported with tensor_parallel_size > 1: set one of them"
                )
        self._check_attention()
        if not isinstance(self.scheduling_policy, SchedulingPolicy):
            raise ValueError(
                f"scheduling_policy must be one of {[p.value for p in SchedulingPolicy]}, "
                f"got {self.scheduling_policy!r}"
            )

    def _check_offload_extras(self) -> None:
        """Validate ``offline_batch`` / ``kv_memory_budget_bytes`` (see the class docstring)."""
        if not isinstance(self.offline_batch, bool):
            raise ValueError(f"offline_batch must be a bool, got {self.offline_batch!r}")
        if self.offline_batch:
            if self.weight_memory_budget_bytes is None and self.device_memory_budget_bytes is None:
                raise ValueError(
                    "offline_batch=True sizes the batch for offloaded weights: set weight_memory_budget_bytes "
                    "or device_memory_budget_bytes"
                )
            if self.scheduling_policy is SchedulingPolicy.MLFQ:
                raise ValueError(
                    "offline_batch=True is an offline throughput job, scheduling_policy 'mlfq' an "
                    "interactive one: use scheduling_policy 'fcfs' or 'priority'"
                )
            if self.speculative is not None:
                raise ValueError(
                    "offline_batch=True is not supported with speculative decoding: set one of them"
                )
        d = self.device_memory_budget_bytes
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, int) or d < 0:
                raise ValueError(f"device_memory_budget_bytes must be an integer >= 0 or None, got {d!r}")
            both = [
                n
                for n in ("weight_memory_budget_bytes", "kv_memory_budget_bytes")
                if getattr(self, n) is not None
            ]
            if both:
                raise ValueError(
                    f"device_memory_budget_bytes (weights and KV, split by the cost model) contradicts "
                    f"{' and '.join(both)}: set one or the other"
                )
            for name, bad in (
                ("tensor_parallel_size > 1", self.tensor_parallel_size > 1),
                (f"weight_dtype {self.weight_dtype!r}", self.weight_dtype != "float32"),
                ("cuda_graph=True", self.cuda_graph),
            ):
                if bad:
                    raise ValueError(f"device_memory_budget_bytes is not supported with {name}")
        h = self.kv_host_budget_bytes
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 0):
            raise ValueError(f"kv_host_budget_bytes must be an integer >= 0 or None, got {h!r}")
        if (h is not None or self.kv_offload_dir is not None) and (
            self.kv_memory_budget_bytes is None and self.device_memory_budget_bytes is None
        ):
            raise ValueError(
                "kv_host_budget_bytes / kv_offload_dir need KV offloading: set kv_memory_budget_bytes "
                "or device_memory_budget_bytes"
            )
        v = self.kv_memory_budget_bytes
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"kv_memory_budget_bytes must be an integer >= 0 or None, got {v!r}")
        if self.tensor_parallel_size > 1:
            raise ValueError(
                "KV offloading (kv_memory_budget_bytes) is not supported with tensor_parallel_size > 1: "
                "set one of them"
            )
        if self.cuda_graph:
            raise ValueError(
                "KV offloading (kv_memory_budget_bytes) is not supported with cuda_graph=True: set one of them"
            )

    def _check_attention(self) -> None:
        """Validate ``attention_backend`` / ``cuda_graph`` (see the class docstring)."""
        from engine.attention_backends import AttentionBackend

        backend = None if self.attention_backend is None else AttentionBackend.parse(self.attention_backend)
        if backend is not None and self.tensor_parallel_size > 1:
            raise ValueError(
                "attention_backend is not supported with tensor_parallel_size > 1: "
                "leave it None (PDSERVE_ATTENTION applies to every rank)"
            )
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph must be a bool, got {self.cuda_graph!r}")
        if isinstance(self.cuda_graph_max_batch_size, bool) or not (
            isinstance(self.cuda_graph_max_batch_size, int) and self.cuda_graph_max_batch_size >= 1
        ):
            raise ValueError(
                f"cuda_graph_max_batch_size must be an integer >= 1, got {self.cuda_graph_max_batch_size!r}"
            )
        if not self.cuda_graph:
            return
        if not self.device.startswith("cuda"):
            raise ValueError(
                f"cuda_graph=True needs device='cuda' (got device={self.device!r}): set cuda_graph=False"
            )
        if backend is not AttentionBackend.TORCH_PAGED:
            raise ValueError(
                "cuda_graph=True needs attention_backend='torch_paged' (the backend captured in the graphs), "
                f"got {self.attention_backend!r}"
            )
        for name, bad in (
            ("tensor_parallel_size > 1", self.tensor_parallel_size > 1),
            ("weight offloading (weight_memory_budget_bytes)", self.weight_memory_budget_bytes is not None),
        ):
            if bad:
                raise ValueError(f"cuda_graph=True is not supported with {name}: set cuda_graph=False")
