"""Engine configuration (frozen)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.scheduler import SchedulingPolicy


@dataclass(frozen=True)
class EngineConfig:
    """How an engine instance runs.

    The KV pool holds ``num_kv_blocks`` blocks of ``block_size`` tokens; when None it is sized
    from ``kv_cache_memory_bytes``. ``max_model_len`` None means the model's
    ``max_position_embeddings``. ``dtype='auto'`` is float32 on CPU, the checkpoint's dtype on CUDA.
    ``tensor_parallel_size`` > 1 splits the model over that many processes (``cuda:0..tp-1`` on
    GPU, CPU cores on CPU; :mod:`engine.tp_runner`); each rank's KV cache holds ``1/tp`` of the
    heads, so ``kv_cache_memory_bytes`` (per rank) buys ``tp`` times the blocks.
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

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
