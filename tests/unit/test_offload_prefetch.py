"""Layer-ahead prefetch of offloaded weights (#15 part 4, engine/offload.py): the copy of the next
offloaded layer is started on the I/O thread before the current offloaded layer computes (or,
when the two share a device slot, as soon as it has computed), and it is still in flight while
that layer computes: the copies overlap compute instead of each layer fetching its own weights
when it is reached.

test_offload_engine.py checks that the output equals the resident model's; a fetch on demand in
each layer's pre-hook would pass that too, which is what this file rules out."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.offload import fixed_nbytes, layer_nbytes
from engine.sampling_params import SamplingParams
from tests import offload_models

NUM_LAYERS = 16
BASE = dict(num_kv_blocks=64, block_size=16, max_num_batched_tokens=64, linear="torch")
COPY_DELAY_S = 0.05  # each copy takes at least this long: in flight while a short layer computes


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    return offload_models.deep_llama(tmp_path_factory, NUM_LAYERS, 77)


@pytest.fixture(scope="module")
def sizes(deep_llama):
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE))
    try:
        return layer_nbytes(eng.runner.model.model.layers[0]), fixed_nbytes(eng.runner.model)
    finally:
        eng.close()


@pytest.mark.parametrize("offloaded", [8, 7], ids=["even", "odd-last-shares-a-slot"])
def test_next_layer_is_copied_ahead_on_the_io_thread_while_this_one_computes(deep_llama, sizes, offloaded):
    lb, fixed = sizes
    budget = fixed + 2 * lb + (NUM_LAYERS - offloaded) * lb
    eng = LLMEngine.from_pretrained(deep_llama, EngineConfig(**BASE, weight_memory_budget_bytes=budget))
    w = eng.weight_offload
    assert w is not None and len(w.offloaded) == offloaded
    main = threading.get_ident()
    copy_threads: set[int] = set()
    copy = w._copy

    def slow_copy(li, s, free):
        copy_threads.add(threading.get_ident())
        time.sleep(COPY_DELAY_S)
        copy(li, s, free)

    w._copy = slow_copy  # type: ignore[method-assign]
    started_ahead: list[bool] = []  # per offloaded layer's forward: next layer's copy started
    in_flight: list[bool] = []  # ... and not finished while this layer computes
    layers = eng.runner.model.model.layers

    def ahead(nxt: int) -> tuple[bool, bool]:
        fut = w._pending.get(nxt)
        held = w._slot_holds[w._slot_of(nxt)] == nxt
        return fut is not None or held, fut is not None and not fut.done()

    def pre(li):
        def hook(_m, _a):  # runs after the offload's own pre-hook (registered later)
            if not w._next_shares_slot(li):
                a, f = ahead(w._next(li))
                started_ahead.append(a)
                in_flight.append(f)

        return hook

    def post(li):
        def hook(_m, _a, _o):  # after the offload's post-hook: the shared slot is free now
            if w._next_shares_slot(li):
                started_ahead.append(ahead(w._next(li))[0])

        return hook

    handles = []
    for li in w.offloaded:
        handles.append(layers[li].register_forward_pre_hook(pre(li)))
        handles.append(layers[li].register_forward_hook(post(li)))
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(3, 320, (k,), generator=g).tolist() for k in (6, 20)]
        outs = eng.generate(prompts, params)
        assert all(len(o.token_ids) == 4 for o in outs)
    finally:
        for h in handles:
            h.remove()
        eng.close()
    steps = 4  # one forward per generated token here (both prompts prefill in one step)
    assert len(started_ahead) >= steps * offloaded
    assert all(started_ahead), "an offloaded layer computed before the next one's copy was started"
    # the copies take COPY_DELAY_S and a tiny layer computes in far less: in flight meanwhile
    assert sum(in_flight) >= len(in_flight) // 2 > 0
    assert copy_threads and main not in copy_threads  # on the I/O thread, not the forward's
