"""Shared set-up for the offloading tests (#15 part 4: test_kv_offload, test_kv_offload_tiers,
test_offload_batch, test_offload_engine): a deep tiny random Llama written to disk, and a run of
an engine reduced to what "identical to resident" compares (token ids and log-probs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.tiny_models import COMMON, random_model


def deep_llama(tmp_path_factory: pytest.TempPathFactory, num_layers: int, seed: int) -> Path:
    """A tiny random Llama (``tests.tiny_models.COMMON`` sizes, untied embeddings) with
    ``num_layers`` decoder layers and weights ~ N(0, 0.08) drawn from ``seed``, saved as
    safetensors in a fresh temp folder; its path."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**COMMON, "num_hidden_layers": num_layers}, tie_word_embeddings=False)
    model = random_model(cfg, seed)
    d = tmp_path_factory.mktemp("deep") / f"llama{num_layers}"
    model.save_pretrained(d, safe_serialization=True)
    return d


def run(
    eng: LLMEngine, prompts, params: SamplingParams | list[SamplingParams]
) -> list[tuple[list[int], list[float]]]:
    """``eng.generate(prompts, params)`` as (token ids, chosen tokens' log-probs) per prompt
    (log-probs empty when ``params`` asks for none)."""
    return [(o.token_ids, [lp.logprob for lp in (o.logprobs or [])]) for o in eng.generate(prompts, params)]
