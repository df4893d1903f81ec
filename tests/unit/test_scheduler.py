"""Scheduler policy tests on a fake model (pure, no torch)."""

from __future__ import annotations

import pytest

from engine.block_manager import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulingPolicy
from pdserve.errors import InvalidRequestError


def _sched(blocks=64, bs=4, **kw) -> Scheduler:
    cfg = SchedulerConfig(
        **{"max_num_batched_tokens": 32, "long_prefill_token_threshold": 16, "max_model_len": 256, **kw}
    )
    return Scheduler(cfg, KVCacheManager(blocks, bs, "m"))


def _req(rid, n, max_tokens=4, priority=0, arrival=0.0) -> Request:
    return Request(rid, range(n), SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival, priority)


def _run_step(s: Scheduler):
    out = s.schedule()
    done = s.update_from_output(out, {x.request.request_id: 7 for x in out.scheduled if x.samples})
    return out, done


def test_token_budget_and_chunking():
    s = _sched()
    s.add_request(_req("a", 40))
    out, _ = _run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 16)]
    out, _ = _run_step(s)
    assert out.scheduled[0].num_new_tokens == 16
    out, _ = _run_step(s)
    assert out.scheduled[0].num_new_tokens == 8 and out.scheduled[0].samples


def test_decodes_first_then_prefill_fills_budget():
    s = _sched()
    s.add_request(_req("d", 4, max_tokens=10))
    _run_step(s)  # d prefilled, has 1 token
    s.add_request(_req("p", 100))
    out, _ = _run_step(s)
    ids = [(x.request.request_id, x.num_new_tokens) for x in out.scheduled]
    assert ids[0] == ("d", 1)
    assert ids[1] == ("p", 16)
    assert out.num_batched_tokens <= 32


def test_finish_by_length_frees_blocks():
    s = _sched()
    s.add_request(_req("a", 5, max_tokens=3))
    finished = []
    while s.has_unfinished():
        finished += _run_step(s)[1]
    assert finished[0].finish_reason is FinishReason.LENGTH
    assert finished[0].output_token_ids == [7, 7, 7]
    assert s.kv.num_free_blocks == 64


def test_eos_and_stop_token_ids():
    s = _sched()
    r = Request("a", range(5), SamplingParams(max_tokens=9, stop_token_ids=(7,)))
    s.add_request(r)
    while s.has_unfinished():
        _run_step(s)
    assert r.finish_reason is FinishReason.STOP and r.stop_reason == 7 and r.num_output_tokens == 1


def test_preemption_when_blocks_run_out_then_recompute():
    s = _sched(blocks=6, bs=4)
    s.add_request(_req("a", 8, max_tokens=10, priority=0))
    s.add_request(_req("b", 8, max_tokens=10, priority=1))
    preempted = []
    steps = 0
    while s.has_unfinished() and steps < 200:
        out, _ = _run_step(s)
        preempted += out.preempted
        steps += 1
    assert "b" in preempted and "a" not in preempted  # the less important request yields
    assert s.num_preemptions >= 1
    assert s.kv.num_free_blocks == 6


def test_priority_order_of_admission():
    s = _sched(max_num_seqs=1)
    s.add_request(_req("late-important", 4, priority=0, arrival=5.0))
    s.add_request(_req("early", 4, priority=3, arrival=1.0))
    out, _ = _run_step(s)
    assert out.scheduled[0].request.request_id == "late-important"


def test_fcfs_ignores_priority():
    s = _sched(max_num_seqs=1, policy=SchedulingPolicy.FCFS)
    s.add_request(_req("late-important", 4, priority=0, arrival=5.0))
    s.add_request(_req("early", 4, priority=3, arrival=1.0))
    out, _ = _run_step(s)
    assert out.scheduled[0].request.request_id == "early"


def test_abort_waiting_and_running():
    s = _sched()
    s.add_request(_req("a", 20))
    s.add_request(_req("b", 20))
    _run_step(s)
    s.abort_request("a")
    s.abort_request("b")
    assert not s.has_unfinished() and s.kv.num_free_blocks == 64


def test_rejects_too_long_and_duplicates():
    s = _sched()
    with pytest.raises(InvalidRequestError, match="context"):
        s.add_request(_req("x", 300))
    s.add_request(_req("y", 3))
    with pytest.raises(InvalidRequestError, match="already"):
        s.add_request(_req("y", 3))


def test_no_chunking_requires_whole_prompt():
    s = _sched(enable_chunked_prefill=False, max_num_batched_tokens=256, long_prefill_token_threshold=0)
    s.add_request(_req("a", 100))
    out, _ = _run_step(s)
    assert out.scheduled[0].num_new_tokens == 100


def test_prefill_only_holds_blocks_until_released():
    s = _sched()
    r = Request("p", range(10), SamplingParams(max_tokens=5), prefill_only=True)
    s.add_request(r)
    _, done = _run_step(s)
    assert done == [r] and r.status is RequestStatus.PREFILLED
    assert s.kv.num_free_blocks == 64 - 3
    s.release_prefilled("p")
    assert s.kv.num_free_blocks == 64


def test_request_that_cannot_fit_alone_is_refused_not_preempted_forever():
    """A prompt that fits but whose prompt + max_tokens outgrows the whole pool would preempt
    itself forever once alone: refused at admission, naming max_tokens. The context caps it."""
    s = _sched(blocks=8, bs=4)  # 32 tokens of KV
    with pytest.raises(InvalidRequestError, match=r"plus max_tokens 40 needs 13 KV blocks.*lower max_tokens"):
        s.add_request(_req("a", 10, max_tokens=40))
    s.add_request(_req("b", 10, max_tokens=22))  # exactly 32 tokens: fits alone
    small_ctx = _sched(blocks=8, bs=4, max_model_len=32)
    small_ctx.add_request(_req("c", 10, max_tokens=100))  # the context ends it at 32 tokens
    done = []
    for _ in range(100):
        _, d = _run_step(s)
        done += d
        if s.requests == {} or not (s.waiting or s.running):
            break
    assert [r.request_id for r in done] == ["b"] and done[0].num_output_tokens == 22
