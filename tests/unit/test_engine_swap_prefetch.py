"""Swap-in prefetch in the real engine (tiny random Llama, fp32, CPU): MLFQ swaps requests out for
their batch seat; the next ones in queue order come back one step ahead of their turn (their KV
copied after the step's forward pass) and run without a copy; outputs equal an unpreempted run,
with prefetch on and off."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulingPolicy
from tests.unit.test_engine_disk_tier import _prompts

PARAMS = [SamplingParams(max_tokens=4 + 7 * (i % 4), temperature=0.0, ignore_eos=True) for i in range(16)]


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def reference(llama):
    eng = LLMEngine.from_pretrained(llama, EngineConfig(num_kv_blocks=256, max_num_batched_tokens=256))
    return [o.token_ids for o in eng.generate(_prompts(), PARAMS)]


@pytest.mark.parametrize("prefetch", [True, False])
def test_mlfq_seat_swaps_with_prefetch_identical(llama, reference, prefetch):
    eng = LLMEngine.from_pretrained(
        llama,
        EngineConfig(
            num_kv_blocks=64,
            max_num_batched_tokens=256,
            swap_space_bytes=64 * 8192,
            enable_prefix_caching=False,  # a seat preemption then swaps (the drop would lose the KV)
            scheduling_policy=SchedulingPolicy.MLFQ,
            mlfq_quantum_iters=2,
            mlfq_base_prefill_s=1e-4,
            max_num_seqs=2,
            swap_prefetch=prefetch,
        ),
    )
    outs = eng.generate(_prompts(), PARAMS)
    st = eng.stats()
    assert st.num_swap_outs > 0 and st.num_swap_ins == st.num_swap_outs
    assert (st.swap_prefetches > 0) is prefetch
    assert [o.token_ids for o in outs] == reference
    assert eng.kv.num_free_blocks == 64 and eng.kv.num_free_host_blocks == eng.kv.num_host_blocks
    assert not eng.scheduler.prefetched and not eng.has_unfinished()
