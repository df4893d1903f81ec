"""The live router's placement policies over real processes on loopback (SmolLM2-135M).

Two clusters: goodput-aware placement (store, router, 1 prefill, 1 decode; tenant quota 1) and
colocated serving (store, router, 1 decode worker that prefills every prompt itself).
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.errors import ResourceExhaustedError
from pdserve.launcher import ClusterSpec, launch
from pdserve.v1 import client_pb2, client_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc
from router.feedback_log import FEEDBACK_LOG_INTERVAL_S
from tests.workers import worker_stats

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
    "You are a meticulous assistant. " * 20 + "Name a colour.",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def goodput(smollm_path):
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            worker_kv_blocks=1024,
            store_capacity_blocks=2048,
            router_args=("--policy", "goodput", "--tenant-max-inflight", "1"),
        )
    )
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def colocated(smollm_path):
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            num_prefill=0,
            worker_kv_blocks=1024,
            store_capacity_blocks=512,
            router_args=("--policy", "colocated"),
        )
    )
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def whole(smollm_path):
    return LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=1024))


def _work(s: worker_pb2.WorkerStats) -> tuple[int, int, int, int]:
    return (
        s.prefill_tokens_computed_total,
        s.prefill_tokens_reused_total,
        s.decode_tokens_total,
        s.requests_finished_total,
    )


def _router_events(cluster, msg: str) -> list[dict]:
    out = []
    for line in list(cluster.logs["router"]):
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if obj.get("msg") == msg:
                out.append(obj)
    return out


def _event(cluster, msg: str, request_id: str, timeout: float = 5.0) -> dict:
    """The router's ``msg`` log event of ``request_id`` (its log lines arrive through a pipe)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in _router_events(cluster, msg) if e.get("request_id") == request_id]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no {msg!r} event for {request_id}"
        time.sleep(0.05)


def test_impossible_slo_rejected_before_any_compute(goodput):
    before = {w: _work(worker_stats(a)) for w, a in goodput.workers.items()}
    with Client(goodput.router_address, timeout=60) as c, pytest.raises(ResourceExhaustedError) as ei:
        c.complete("The capital of France is", max_tokens=8, temperature=0.0, ttft_s=0.001)
    assert ei.value.retry_after_s is not None and ei.value.retry_after_s > 0
    assert "TTFT" in ei.value.message
    time.sleep(0.2)
    after = {w: _work(worker_stats(a)) for w, a in goodput.workers.items()}
    assert after == before  # neither worker computed a token for it


def test_generous_slo_succeeds_and_feeds_online_correction(goodput, whole):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref = whole.generate(PROMPTS, params)
    time.sleep(FEEDBACK_LOG_INTERVAL_S + 0.3)  # a line held for earlier requests is out by now
    with Client(goodput.router_address, timeout=120) as c:
        got = [c.complete(p, params, ttft_s=60.0, tpot_s=10.0) for p in PROMPTS]
    for p, r, g in zip(PROMPTS, ref, got, strict=True):
        assert g.token_ids == r.token_ids, p  # exact, whichever mode the policy chose
    # the "policy feedback" line comes at most once a second (router.feedback_log): the state
    # after the last request is logged naming it, at once or when the second ends
    last = _event(goodput, "policy feedback", got[-1].request_id, timeout=FEEDBACK_LOG_INTERVAL_S + 5)
    # the state before them: the last line logged before the first naming one of them (in log
    # order, not read before they ran: the router's log reaches the test through a pipe, which a
    # loaded host can delay past the sleep)
    seen = _router_events(goodput, "policy feedback")
    ours = {g.request_id for g in got}
    first_ours = next(i for i, e in enumerate(seen) if e.get("request_id") in ours)
    before = seen[first_ours - 1] if first_ours else {"tpot_samples": 0, "ttft_samples": 0}
    # 12 tokens each (>= tpot_learn_min_tokens): every request teaches the TPOT correction; their
    # TTFT predictions are far under a quarter of the 60 s SLO, so they do not teach the TTFT
    # factor (ttft_learn_min_share: such errors are per-request overhead, not prefill speed)
    assert last["tpot_samples"] >= before["tpot_samples"] + len(PROMPTS)
    assert last["ttft_samples"] == before["ttft_samples"]
    assert last["length_samples"] >= len(PROMPTS)
    assert last["length_mae"] >= 0 and 0 <= last["length_within_2x"] <= 1  # predictor accuracy
    assert last["tpot_factor"] != 1.0  # measured latencies moved the seed prediction
    first = _event(goodput, "routed", got[0].request_id)
    assert first["policy"] == "goodput" and first["predicted_ttft_s"] > 0
    # the shared prefix of PROMPTS[4] is now in the KV store: placement sees it before prefill
    with Client(goodput.router_address, timeout=120) as c:
        again = c.complete(PROMPTS[4] + " And another.", params, ttft_s=60.0, tpot_s=10.0)
    assert again.finish.cached_prompt_tokens > 0
    assert _event(goodput, "routed", again.request_id)["store_prefix_blocks"] > 0
    # a caller's own output-length guess overrides the predictor
    req = client_pb2.GenerateRequest(
        prompt="Count to five:",
        sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0),
        request_id="guess-77",
        predicted_output_tokens=77,
    )
    with grpc.insecure_channel(goodput.router_address) as ch:
        assert list(client_pb2_grpc.GenerateStub(ch).Generate(req, timeout=60))[-1].HasField("finish")
    assert _event(goodput, "routed", "guess-77")["predicted_output_tokens"] == 77


def test_short_prompt_prefilled_on_decode_worker_while_prefill_is_busy(goodput, whole):
    """Conditional disaggregation: a long prompt occupies the prefill worker; a short one placed
    meanwhile is predicted faster on the decode worker, runs whole there, and is exact."""
    long_prompt = "The history of the city is long and complicated. " * 120
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results: dict[str, list[int]] = {}
    with Client(goodput.router_address, timeout=180) as c:
        t = threading.Thread(
            target=lambda: results.update(
                long=c.complete(long_prompt, params, tenant="t-long", request_id="long-1").token_ids
            )
        )
        t.start()
        assert _event(goodput, "routed", "long-1", timeout=60)["local_prefill"] is False
        short = c.complete("Hello there,", params, tenant="t-short", request_id="short-1")
        t.join()
    routed = _event(goodput, "routed", "short-1")
    assert routed["local_prefill"] is True and routed["prefill"] == routed["decode"] == "decode-0"
    ref = whole.generate([long_prompt, "Hello there,"], params)
    assert results["long"] == ref[0].token_ids
    assert short.token_ids == ref[1].token_ids


def test_tenant_quota_refuses_second_concurrent_request(goodput):
    with Client(goodput.router_address, timeout=120) as c:
        stream = c.generate(
            "Tell me a long story.", max_tokens=300, temperature=0.0, ignore_eos=True, tenant="acme"
        )
        it = iter(stream)
        next(it)  # tenant acme now has one request in flight
        with pytest.raises(ResourceExhaustedError, match="acme") as ei:
            c.complete("Hi", max_tokens=2, tenant="acme")
        assert ei.value.retry_after_s is not None and ei.value.retry_after_s > 0
        assert c.complete("Hi", max_tokens=2, tenant="other").finish.completion_tokens == 2
        stream.cancel()
        assert list(it) == []
        deadline = time.monotonic() + 10
        while True:  # the cancelled request released its quota slot
            try:
                c.complete("Hi", max_tokens=2, tenant="acme")
                break
            except ResourceExhaustedError:
                assert time.monotonic() < deadline
                time.sleep(0.1)


def test_colocated_output_equals_whole_engine(colocated, whole):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ref = whole.generate(PROMPTS, params)
    out: dict[int, list[int]] = {}
    with Client(colocated.router_address, timeout=120) as c:

        def run(i: int) -> None:
            out[i] = c.complete(PROMPTS[i], params).token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, r in enumerate(ref):
            assert out[i] == r.token_ids, PROMPTS[i]
        seeded = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
        assert c.complete(PROMPTS[1], seeded).token_ids == whole.generate([PROMPTS[1]], seeded)[0].token_ids
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        got = c.complete(msgs, max_tokens=48, temperature=0.0)
        wref = whole.generate(
            [whole.tokenizer.encode_chat(msgs)], SamplingParams(max_tokens=48, temperature=0.0)
        )
        assert got.token_ids == wref[0].token_ids and got.text == wref[0].text
        assert got.finish.reason == "stop"
        fin = c.complete(PROMPTS[4], params).finish
        assert fin.cached_prompt_tokens > 0  # the decode worker's own prefix cache
        assert 0 < fin.ttft_s <= fin.e2e_s and len(fin.token_times_s) == 16
    st = worker_stats(colocated.workers["decode-0"])
    assert st.prefill_tokens_computed_total > 0 and st.kv_blocks_used == 0


def test_local_prefill_decode_rejects_a_kv_handle(colocated):
    req = worker_pb2.DecodeRequest(
        request_id="bad",
        prompt_token_ids=[1, 2, 3],
        sampling=common_pb2.SamplingParams(max_tokens=2),
        local_prefill=True,
        first_token=5,
    )
    with grpc.insecure_channel(colocated.workers["decode-0"]) as ch, pytest.raises(grpc.RpcError) as ei:
        list(worker_pb2_grpc.WorkerStub(ch).Decode(req, timeout=30))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "local_prefill" in ei.value.details()
