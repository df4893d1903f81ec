"""Weight offloading in the engine (engine.offload): a model over its device budget runs with the
offloaded layers on the host or on disk, and its greedy tokens and log-probs equal the resident
model's; the device working set stays within the budget; unsupported combinations are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.offload import OffloadedWeights, fixed_nbytes, layer_nbytes
from engine.offload_policy import OffloadPolicyError, WeightPlacement, WeightTier
from engine.sampling_params import SamplingParams
from tests import offload_models

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
# chunked prefill too; linear 'torch': an offloaded model keeps torch's linear (engine_linear), so the
# resident reference it must equal exactly takes it too (the default 'auto' would round differently)
BASE = dict(num_kv_blocks=96, block_size=16, max_num_batched_tokens=64, linear="torch")
NUM_LAYERS = 16  # offloading k layers costs two layer slots: 25% must be more than 2


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 320, (k,), generator=g).tolist() for k in (5, 40, 90, 17)]


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    """A tiny random Llama with 16 layers (enough to cycle the two device slots)."""
    return offload_models.deep_llama(tmp_path_factory, NUM_LAYERS, 1234)


def _run(eng: LLMEngine, prompts) -> list[tuple[list[int], list[float]]]:
    return offload_models.run(eng, prompts, GREEDY)


@pytest.fixture(scope="module")
def resident(deep_llama):
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE))
    sizes = (layer_nbytes(eng.runner.model.model.layers[0]), fixed_nbytes(eng.runner.model))
    out = (_run(eng, _prompts()), _run(eng, _prompts()[:2]))  # a second batch reuses cached prefixes
    eng.close()
    return out, sizes


def _model_storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages the model's parameters and buffers live in (its working set)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize(
    ("offloaded", "host_layers"),
    [(4, None), (8, None), (16, None), (12, 5), (16, 0)],
    ids=["25%-host", "50%-host", "100%-host", "75%-host+disk", "100%-disk"],
)
def test_offloaded_output_equals_resident(deep_llama, resident, tmp_path, offloaded, host_layers):
    (want, want2), (lb, fixed) = resident
    budget = fixed + 2 * lb + (NUM_LAYERS - offloaded) * lb
    host = None if host_layers is None else host_layers * lb
    cfg = EngineConfig(
        **BASE,
        weight_memory_budget_bytes=budget,
        weight_host_budget_bytes=host,
        weight_offload_dir=str(tmp_path),
    )
    eng = LLMEngine.from_pretrained(deep_llama, cfg)
    try:
        w = eng.weight_offload
        assert w is not None
        p = w.placement
        assert len(p.offloaded) == offloaded
        assert p.tiers.count(WeightTier.DISK) == (0 if host_layers is None else offloaded - host_layers)
        assert p.device_bytes <= budget
        # what the model really holds: non-layer weights, resident layers and the two slots
        assert _model_storage_bytes(eng.runner.model) == p.device_bytes
        assert _run(eng, _prompts()) == want
        st = w.snapshot()
        assert st.copies > 0 and st.bytes_copied >= st.copies * lb // 2  # layers were copied in
        assert os.listdir(tmp_path) == []  # the disk tier's file is unlinked (lives with the fd)
        # a second batch after the first (the slots cycle across steps and across generate calls)
        assert _run(eng, _prompts()[:2]) == want2
    finally:
        eng.close()


def test_budget_over_the_weights_offloads_nothing(deep_llama, resident):
    _, (lb, fixed) = resident
    eng = LLMEngine.from_pretrained(
        deep_llama, EngineConfig(**BASE, weight_memory_budget_bytes=fixed + NUM_LAYERS * lb)
    )
    try:
        assert eng.weight_offload is not None and eng.weight_offload.placement.offloaded == ()
        assert eng.weight_offload.slots == []
    finally:
        eng.close()


def test_budget_below_minimum_is_refused_naming_it(deep_llama, resident):
    _, (lb, fixed) = resident
    with pytest.raises(OffloadPolicyError, match=f"minimum {fixed + 2 * lb} bytes"):
        LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE, weight_memory_budget_bytes=fixed + lb))


@pytest.mark.parametrize("family", ["llama_gelu_bias", "qwen2_swa", "llama3_rope"])
def test_other_tiny_families_offloaded(tiny_models, family, tmp_path):
    """Biases, sliding windows and tied embeddings: a 2-layer model (a budget cannot make the
    policy offload it: two slots cost what two layers do) with a placement given to the I/O side,
    layer 0 on the host and layer 1 on disk."""
    path = tiny_models[family]
    ref = LLMEngine.from_pretrained(path, EngineConfig(**BASE))
    want = _run(ref, _prompts())
    ref.close()
    eng = LLMEngine.from_pretrained(path, EngineConfig(**BASE))
    lb = layer_nbytes(eng.runner.model.model.layers[0])
    placement = WeightPlacement(
        tiers=(WeightTier.HOST, WeightTier.DISK),
        slot_bytes=lb,
        num_slots=2,
        device_bytes=fixed_nbytes(eng.runner.model) + 2 * lb,
        host_bytes=lb,
        disk_bytes=lb,
        predicted_step_s=0.0,
    )
    eng.weight_offload = OffloadedWeights(eng.runner.model, placement, str(tmp_path))
    try:
        assert _model_storage_bytes(eng.runner.model) == placement.device_bytes
        assert _run(eng, _prompts()) == want
        assert eng.weight_offload.snapshot().copies == 2  # each layer keeps its slot after the first copy
    finally:
        eng.close()


def test_refused_combinations_name_the_field():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(weight_memory_budget_bytes=1 << 30, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="weight_dtype 'int8'"):
        EngineConfig(weight_memory_budget_bytes=1 << 30, weight_dtype="int8")
    with pytest.raises(ValueError, match="set weight_memory_budget_bytes"):
        EngineConfig(weight_host_budget_bytes=1 << 30)
    with pytest.raises(ValueError, match="set weight_memory_budget_bytes"):
        EngineConfig(weight_offload_dir="/tmp")
    with pytest.raises(ValueError, match="weight_memory_budget_bytes must be"):
        EngineConfig(weight_memory_budget_bytes=-1)
    with pytest.raises(ValueError, match="weight_memory_budget_bytes must be"):
        EngineConfig(weight_memory_budget_bytes=1.5)  # type: ignore[arg-type]


def test_lora_with_offloading_is_refused(deep_llama):
    from engine.lora import LoRAConfig
    from pdserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="LoRA adapters are not supported with weight offloading"):
        LLMEngine.from_pretrained(
            deep_llama,
            EngineConfig(**BASE, weight_memory_budget_bytes=1 << 30),
            lora=LoRAConfig(max_lora_rank=8),
        )


def test_smollm2_half_offloaded_equals_resident(smollm_path, tmp_path):
    prompts = [[1, 504, 3458, 282, 4649, 314], list(range(100, 160))]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    cfg = dict(num_kv_blocks=32, block_size=16, max_num_batched_tokens=128, linear="torch")  # see BASE
    ref = LLMEngine.from_pretrained(smollm_path, EngineConfig(**cfg))
    model = ref.runner.model
    total = fixed_nbytes(model) + sum(layer_nbytes(x) for x in model.model.layers)
    want = [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in ref.generate(prompts, params)]
    ref.close()
    del ref, model
    eng = LLMEngine.from_pretrained(
        smollm_path,
        EngineConfig(
            **cfg,
            weight_memory_budget_bytes=total // 2,
            weight_host_budget_bytes=total // 4,
            weight_offload_dir=str(tmp_path),
        ),
    )
    try:
        p = eng.weight_offload.placement
        assert WeightTier.DISK in p.tiers and WeightTier.HOST in p.tiers and WeightTier.DEVICE in p.tiers
        assert p.device_bytes <= total // 2
        got = [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in eng.generate(prompts, params)]
        assert got == want
    finally:
        eng.close()


@pytest.mark.gpu
def test_cuda_offloaded_output_equals_resident(deep_llama, resident, tmp_path):
    _, (lb, fixed) = resident
    base = dict(BASE, device="cuda", dtype="float32")
    ref = LLMEngine.from_pretrained(deep_llama, EngineConfig(**base))
    want = _run(ref, _prompts())
    ref.close()
    eng = LLMEngine.from_pretrained(
        deep_llama,
        EngineConfig(
            **base,
            weight_memory_budget_bytes=fixed + 2 * lb + 2 * lb,
            weight_host_budget_bytes=3 * lb,
            weight_offload_dir=str(tmp_path),
        ),
    )
    try:
        assert eng.weight_offload is not None and eng.weight_offload.cuda
        assert _run(eng, _prompts()) == want
        assert eng.weight_offload.snapshot().copies > 0
    finally:
        eng.close()


def test_offline_batch_size_from_the_measured_rates(deep_llama, resident):
    from engine.offload import offline_batch_size

    _, (lb, fixed) = resident
    eng = LLMEngine.from_pretrained(
        deep_llama, EngineConfig(**BASE, weight_memory_budget_bytes=fixed + 6 * lb)
    )
    try:
        ch = offline_batch_size(eng.weight_offload, max_batch=32)
        assert 1 <= ch.batch_size <= 32
        assert ch.seqs_per_s >= 0.9 * ch.max_seqs_per_s
    finally:
        eng.close()
