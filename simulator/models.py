"""Model shapes: what memory sizing, KV transfer and first-principles attention need.

Shapes are the public Hugging Face configs. ``num_params`` counts all weights (embeddings
included); weights are fp16/bf16 (``dtype_bytes`` = 2) and split evenly over TP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden: int
    vocab_size: int
    num_params: float
    max_model_len: int
    dtype_bytes: int = 2
    vidur_id: str | None = None  # directory under vidur/data/profiling/compute/<gpu>/
    distserve_id: str | None = None  # key in DistServe's profile json
    tied_embeddings: bool = False  # the LM head shares the input embedding's weights (OPT)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers and heads (whole model)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes

    @property
    def non_layer_params(self) -> float:
        """Weights outside the decoder layers: the input embedding and the LM head (one matrix
        when tied); norms and positional tables are left in the layers' share."""
        return self.vocab_size * self.hidden * (1 if self.tied_embeddings else 2)

    def valid_tp(self, tp: int) -> bool:
        return (
            tp >= 1
            and self.num_heads % tp == 0
            and (self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0)
        )


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(
            "llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 6.74e9, 4096, vidur_id="meta-llama/Llama-2-7b-hf"
        ),
        ModelSpec(
            "llama-2-70b", 80, 8192, 64, 8, 28672, 32000, 69.0e9, 4096, vidur_id="meta-llama/Llama-2-70b-hf"
        ),
        ModelSpec(
            "llama-3-8b", 32, 4096, 32, 8, 14336, 128256, 8.03e9, 32768, vidur_id="meta-llama/Meta-Llama-3-8B"
        ),
        ModelSpec(
            "codellama-34b",
            48,
            8192,
            64,
            8,
            22016,
            32000,
            33.7e9,
            16384,
            vidur_id="codellama/CodeLlama-34b-Instruct-hf",
        ),
        ModelSpec(
            "opt-13b",
            40,
            5120,
            40,
            40,
            20480,
            50272,
            12.9e9,
            2048,
            distserve_id="facebook/opt-13b",
            tied_embeddings=True,
        ),
        ModelSpec(
            "opt-66b",
            64,
            9216,
            72,
            72,
            36864,
            50272,
            65.7e9,
            2048,
            distserve_id="facebook/opt-66b",
            tied_embeddings=True,
        ),
    )
}


def model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None
