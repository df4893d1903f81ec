"""KV offloading (issue #15 part 4, FlexGen's KV of running requests): with a KV memory budget under
the pool, the KV of 25/50/100% of the layers lives in the host pool and is copied into staging
buffers layer ahead; greedy tokens and log-probs and seeded samples equal the resident engine's,
with prefix caching, chunked prefill, and preemption by recompute and by swap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.kv_offload import OffloadedKV
from engine.llm_engine import LLMEngine
from engine.offload_policy import OffloadPolicyError
from engine.sampling_params import SamplingParams
from tests import offload_models
from tests.tiny_models import COMMON

NUM_LAYERS = 16
BLOCKS = 64
BS = 16
# one layer's KV pool: (K, V) * blocks * block_size * kv_heads * head_dim * fp32
LAYER_KV = (
    2
    * BLOCKS
    * BS
    * COMMON["num_key_value_heads"]
    * (COMMON["hidden_size"] // COMMON["num_attention_heads"])
    * 4
)
GREEDY = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=2)
# linear "torch": KV offloading turns the fused native forward off (it bypasses the layers' hooks),
# so the resident reference takes the same unfused path (the fused one rounds differently)
BASE = dict(num_kv_blocks=BLOCKS, block_size=BS, max_num_batched_tokens=96, linear="torch")


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> Path:
    return offload_models.deep_llama(tmp_path_factory, NUM_LAYERS, 4321)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(9)
    shared = torch.randint(3, 320, (40,), generator=g).tolist()  # a prefix some prompts share
    out = []
    for i, k in enumerate((5, 40, 90, 17, 33, 61)):
        p = torch.randint(3, 320, (k,), generator=g).tolist()
        out.append(shared + p if i % 2 else p)
    return out


def _run(eng: LLMEngine, prompts, params=GREEDY) -> list[tuple[list[int], list[float]]]:
    return offload_models.run(eng, prompts, params)


def _seeded() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=50 + i) for i in range(6)]


@pytest.fixture(scope="module")
def resident(deep_llama):
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE))
    assert eng.runner.kv_cache.shape[2] == BLOCKS
    out = (
        _run(eng, _prompts()),
        _run(eng, _prompts()[:3]),
        [o.token_ids for o in eng.generate(_prompts(), _seeded())],
    )
    eng.close()
    return out


def _budget(offloaded: int) -> int:
    return (NUM_LAYERS - offloaded + min(offloaded, 2)) * LAYER_KV


@pytest.mark.parametrize("offloaded", [4, 8, 16], ids=["25%", "50%", "100%"])
def test_kv_offloaded_output_equals_resident(deep_llama, resident, offloaded):
    want, want2, want_seeded = resident
    budget = _budget(offloaded)
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE, kv_memory_budget_bytes=budget))
    try:
        kvo = eng.kv_offload
        assert kvo is not None and isinstance(eng.runner.kv_cache, OffloadedKV)
        p = kvo.placement
        assert len(p.offloaded) == offloaded and p.fraction == offloaded / NUM_LAYERS
        assert p.layer_bytes == LAYER_KV
        assert kvo.nbytes == p.device_bytes <= budget  # what the device really holds
        assert sum(t.numel() for t in kvo.host_kv) * 4 == p.host_bytes and not p.disk
        if offloaded < NUM_LAYERS:
            assert 0 not in p.offloaded  # layer 0's read could not overlap an earlier layer
        assert _run(eng, _prompts()) == want
        st = kvo.snapshot()
        assert st.reads >= offloaded and st.read_bytes > 0 and st.write_bytes > 0
        reused = eng.prefill_tokens_reused
        assert _run(eng, _prompts()[:3]) == want2  # prefix-cache hits read blocks from the host pool
        assert eng.prefill_tokens_reused > reused
        assert [o.token_ids for o in eng.generate(_prompts(), _seeded())] == want_seeded
    finally:
        eng.close()


@pytest.mark.parametrize("swap", [False, True], ids=["recompute", "swap"])
def test_preemption_under_kv_offload(deep_llama, swap):
    """A pool too small for the batch: requests are preempted (recomputed, or swapped to the host
    swap pool, which gathers the offloaded layers' blocks from the KV host pool) and resume exactly
    as in the resident engine with the same pool (the same batches, so the same rounding)."""
    block = LAYER_KV // BLOCKS * NUM_LAYERS
    small = dict(**{**BASE, "num_kv_blocks": 14}, swap_space_bytes=64 * block if swap else 0)
    ref = LLMEngine.from_pretrained(deep_llama, EngineConfig(**small))  # the same batches, resident
    want = _run(ref, _prompts())
    want_seeded = [o.token_ids for o in ref.generate(_prompts(), _seeded())]
    ref.close()
    eng = LLMEngine.from_pretrained(
        deep_llama, EngineConfig(**small, kv_memory_budget_bytes=_budget(8) * 14 // BLOCKS)
    )
    try:
        assert eng.kv_offload is not None and len(eng.kv_offload.placement.offloaded) == 8
        got = _run(eng, _prompts())
        if not swap:
            assert got == want
        else:  # swap or recompute is chosen per request from measured rates: the batches (and so
            # the rounding) can differ between the two engines; the tokens may not
            assert [t for t, _ in got] == [t for t, _ in want]
            for (_, lp), (_, wl) in zip(got, want, strict=True):
                assert lp == pytest.approx(wl, abs=1e-4)
        st = eng.stats()
        assert st.num_preemptions > 0
        if swap:
            assert st.num_swap_outs > 0
        assert [o.token_ids for o in eng.generate(_prompts(), _seeded())] == want_seeded
    finally:
        eng.close()


def test_chunked_prefill_under_kv_offload(deep_llama):
    """Prefill chunks continuing a sequence gather earlier blocks from the staging buffers; the
    reference is the resident engine with the same chunking."""
    chunked = dict(**{**BASE, "max_num_batched_tokens": 24}, long_prefill_token_threshold=16)
    ref = LLMEngine.from_pretrained(deep_llama, EngineConfig(**chunked))
    want = _run(ref, _prompts())
    ref.close()
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**chunked, kv_memory_budget_bytes=_budget(8)))
    try:
        assert _run(eng, _prompts()) == want
    finally:
        eng.close()


def test_kv_export_import_reads_the_host_pool(deep_llama):
    """export_blocks / import_blocks (disaggregated handoff, copy-on-write) gather and scatter the
    offloaded layers' blocks in the host pool."""
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE, kv_memory_budget_bytes=_budget(8)))
    try:
        kvo = eng.kv_offload
        assert kvo is not None
        src = torch.randn(3, NUM_LAYERS, 2, BS, 2, 16)  # [n, L, 2, bs, kvh, hd]
        eng.runner.import_blocks([5, 9, 2], src)
        got = eng.runner.export_blocks([5, 9, 2])
        assert torch.equal(got, src)
        k = kvo.placement.offloaded[0]
        assert torch.equal(kvo.host_kv[0][:, 9], src[1, k])
    finally:
        eng.close()


def test_budget_over_the_pool_offloads_nothing(deep_llama):
    eng = LLMEngine.from_pretrained(
        deep_llama, EngineConfig(**BASE, kv_memory_budget_bytes=NUM_LAYERS * LAYER_KV)
    )
    try:
        assert eng.kv_offload is not None and eng.kv_offload.placement.offloaded == ()
        assert eng.kv_offload.slots == []
    finally:
        eng.close()


def test_budget_below_minimum_is_refused_naming_it(deep_llama):
    with pytest.raises(OffloadPolicyError, match=f"minimum {2 * LAYER_KV} bytes"):
        LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE, kv_memory_budget_bytes=2 * LAYER_KV - 1))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(kv_memory_budget_bytes=-1), "kv_memory_budget_bytes must be"),
        (dict(kv_memory_budget_bytes=1, tensor_parallel_size=2), "tensor_parallel_size"),
        (
            dict(kv_memory_budget_bytes=1, cuda_graph=True, device="cuda", attention_backend="torch_paged"),
            "cuda_graph",
        ),
    ],
)
def test_unsupported_kv_offload_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)


def test_device_budget_split_between_weights_and_kv(deep_llama, resident):
    """EngineConfig.device_memory_budget_bytes: the cost model splits one budget between the
    weights and the KV pool (whatever split the measured rates give, the output is the resident
    engine's and the two parts fit the budget)."""
    from engine.offload import fixed_nbytes, layer_nbytes

    want = resident[0]
    probe = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE))
    m = probe.runner.model
    weights = fixed_nbytes(m) + sum(layer_nbytes(x) for x in m.model.layers)
    probe.close()
    budget = weights + NUM_LAYERS * LAYER_KV - 6 * LAYER_KV  # six layers' KV (or the weights' worth) short
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE, device_memory_budget_bytes=budget))
    try:
        s = eng.memory_split
        assert s is not None
        assert s.weight_budget_bytes + s.kv_budget_bytes <= budget
        assert eng.config.weight_memory_budget_bytes == s.weight_budget_bytes
        assert eng.config.kv_memory_budget_bytes == s.kv_budget_bytes
        assert eng.kv_offload is not None and eng.kv_offload.placement.offloaded == s.kv.offloaded
        assert eng.weight_offload is not None and eng.weight_offload.placement.tiers == s.weights.tiers
        assert s.weights.offloaded or s.kv.offloaded  # something had to leave the device
        assert eng.weight_offload.placement.device_bytes + eng.kv_offload.nbytes <= budget
        assert _run(eng, _prompts()) == want
    finally:
        eng.close()


@pytest.mark.parametrize("other", ["weight_memory_budget_bytes", "kv_memory_budget_bytes"])
def test_device_budget_with_a_part_budget_is_refused_naming_it(other):
    with pytest.raises(ValueError, match=f"contradicts {other}"):
        EngineConfig(device_memory_budget_bytes=10**9, **{other: 10**8})


@pytest.mark.parametrize(
    ("family", "backend"),
    [("qwen2_swa", None), ("mistral_swa", None), ("llama3_rope", None), ("llama", "gather")],
)
def test_other_tiny_families_with_kv_offloaded(tiny_models, family, backend):
    """Sliding windows (mixed, and every layer windowed: out-of-window blocks freed), tied
    embeddings, and the gather decode path: a 2-layer model with layer 1's KV in the host pool
    (a placement given to the I/O side: a budget cannot make the policy offload it)."""
    from engine.kv_offload import install
    from engine.offload_policy import kv_placement

    cfg = EngineConfig(**{**BASE, "num_kv_blocks": 48}, attention_backend=backend)
    prompts = [p[:60] for p in _prompts()]
    ref = LLMEngine.from_pretrained(tiny_models[family], cfg)
    want = _run(ref, prompts)
    ref.close()
    eng = LLMEngine.from_pretrained(tiny_models[family], cfg)
    cache = eng.runner.kv_cache
    bb = cache[0, :, 0].numel() * cache.element_size()
    eng.kv_offload = install(eng.runner, eng.kv, kv_placement(2, 48, bb, (1,)))
    try:
        assert _run(eng, prompts) == want
        assert eng.kv_offload.snapshot().read_bytes > 0
    finally:
        eng.close()


@pytest.mark.gpu
@pytest.mark.parametrize("swap", [False, True], ids=["plain", "swap"])
def test_cuda_kv_offloaded_output_equals_resident(deep_llama, swap):
    """The CUDA path: pinned host pool, copies on a side stream, the compute stream waiting on
    events (never run here: no GPU was lent to this task)."""
    block = LAYER_KV // BLOCKS * NUM_LAYERS
    # torch_paged: a FlashInfer / flash-attn plan holds block tables the staging packing renumbers
    base = dict(
        BASE,
        device="cuda",
        dtype="float32",
        attention_backend="torch_paged",
        swap_space_bytes=64 * block if swap else 0,
    )
    if swap:
        base["num_kv_blocks"] = 14
    ref = LLMEngine.from_pretrained(deep_llama, EngineConfig(**base))
    want = _run(ref, _prompts())
    ref.close()
    budget = _budget(8) * base["num_kv_blocks"] // BLOCKS
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**base, kv_memory_budget_bytes=budget))
    try:
        assert eng.kv_offload is not None and eng.kv_offload.cuda
        got = _run(eng, _prompts())
        assert [t for t, _ in got] == [t for t, _ in want]
        if not swap:
            assert got == want
        assert eng.kv_offload.snapshot().read_bytes > 0
    finally:
        eng.close()
