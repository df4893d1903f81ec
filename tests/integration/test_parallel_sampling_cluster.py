"""Parallel sampling (n > 1, best_of) through the cluster, over real processes on loopback with
the real SmolLM2-135M model: client -> router -> prefill (prompt[:-1] once) -> store -> ONE
decode worker forking the choices.

One cluster (store, router, 1 prefill, decode-0; a long heartbeat timeout so that a killed
worker stays registered) serves the module. Checked: every choice equals the engine run whole
with n=3 and the request run alone with seed+i; best_of; a 1-token prompt (local path); a
group decode-0's pool could not adopt from a handoff (run there whole);
validation at the edge; cancellation, and a decode worker killed mid-stream (the whole group is
re-dispatched exactly), each leaving no block or lease behind.
"""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.errors import InvalidRequestError
from pdserve.launcher import ClusterSpec, launch
from pdserve.v1 import client_pb2, client_pb2_grpc, common_pb2
from tests.integration.test_redispatch import _add_big_decode_worker, _redispatches, _wait_baseline
from tests.polling import wait_for
from tests.workers import worker_stats

PARAMS = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=40, ignore_eos=True, n=3, logprobs=1)
PROMPT = "Write one sentence about a red fox in the snow."


@pytest.fixture(scope="module")
def cluster(smollm_path):
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            worker_kv_blocks=128,
            store_capacity_blocks=1024,
            router_args=("--heartbeat-timeout-s", "120"),
        )
    )
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def whole(smollm_path):
    return LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=256))


def _alone(whole: LLMEngine, prompt, params: SamplingParams, i: int):
    return whole.generate([prompt], replace(params, n=1, best_of=None, seed=params.seed + i))[0]


def _router_generation_tokens(cluster) -> float:
    """The router's pdserve_router_generation_tokens_total, scraped from its /metrics."""
    import urllib.request

    body = urllib.request.urlopen(f"http://{cluster.metrics['router']}/metrics", timeout=30).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("pdserve_router_generation_tokens_total")
    )


def test_disaggregated_choices_equal_whole_engine_and_each_alone(cluster, client, whole):
    _wait_baseline(cluster)
    before = _router_generation_tokens(cluster)
    got = client.complete_choices(PROMPT, PARAMS)
    # the router counts every choice's output tokens, not only the last choice's; it records a
    # request after writing its last finish (the client may return first): waited for
    want = before + 3 * PARAMS.max_tokens
    wait_for(lambda: _router_generation_tokens(cluster) >= want, 10, "the group's tokens counted")
    assert _router_generation_tokens(cluster) - before == 3 * PARAMS.max_tokens
    ref = whole.generate_choices(PROMPT, PARAMS)
    assert len(got) == 3
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        alone = _alone(whole, PROMPT, PARAMS, i)
        assert g.token_ids == r.token_ids == alone.token_ids, i
        assert g.text == r.text == alone.text
        assert g.finish.reason == "length" and g.finish.completion_tokens == PARAMS.max_tokens
        assert g.finish.prompt_tokens == len(whole.tokenize(PROMPT))
    assert len({tuple(g.token_ids) for g in got}) > 1  # the choices differ
    # streamed: chunks carry their choice's index and logprobs, each choice ends with its finish
    chunks = list(client.generate(PROMPT, PARAMS))
    assert {c.choice_index for c in chunks} == {0, 1, 2}
    for i in range(3):
        mine = [c for c in chunks if c.choice_index == i]
        assert [t for c in mine for t in c.token_ids] == got[i].token_ids
        assert [lp.token_id for c in mine for lp in c.logprobs] == got[i].token_ids
        assert mine[-1].finish is not None and all(c.finish is None for c in mine[:-1])
    assert chunks[-1].finish is not None
    _wait_baseline(cluster)


def test_best_of_returns_the_ranked_n(cluster, client, whole):
    params = replace(PARAMS, n=2, best_of=4, logprobs=None, seed=3, max_tokens=12)
    got = client.complete_choices(PROMPT, params)
    ref = whole.generate_choices(PROMPT, params)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert [g.text for g in got] == [r.text for r in ref]
    _wait_baseline(cluster)


def test_one_token_prompt_group_runs_on_the_decode_worker(cluster, client, whole):
    ids = whole.tokenize("Hello")[:1]
    params = replace(PARAMS, max_tokens=8, logprobs=None)
    got = client.complete_choices(ids, params)
    assert [g.token_ids for g in got] == [r.token_ids for r in whole.generate_choices(ids, params)]
    _wait_baseline(cluster)


def test_group_the_decode_pool_could_not_adopt_runs_whole_there(cluster, client, whole):
    """64 choices over a 1,040-token prompt: handed off, they would take 65 prefix blocks + 64 at
    once, more than decode-0's 128, and it would refuse the handoff after the prefill. The router
    sees that from the pool shape decode-0 reports and runs the group there whole (a local
    prefill; choices short of a block wait their turn): every choice equals the engine's."""
    ids = (whole.tokenize(PROMPT) * 200)[:1040]
    params = replace(PARAMS, n=64, max_tokens=2, logprobs=None, seed=21)
    got = client.complete_choices(ids, params)
    ref = whole.generate_choices(ids, params)
    assert len(got) == 64
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    _wait_baseline(cluster)


@pytest.mark.parametrize(
    ("sampling", "match"),
    [
        (common_pb2.SamplingParams(n=2, temperature=0.0), "temperature 0"),
        (common_pb2.SamplingParams(n=3, best_of=2), "best_of must be"),
        (common_pb2.SamplingParams(n=65), "n must be"),
        (common_pb2.SamplingParams(n=2, seed_position_offset=1), "seed_position_offset"),
    ],
)
def test_bad_group_is_invalid_argument_naming_the_field(cluster, sampling, match):
    req = client_pb2.GenerateRequest(prompt="hi", sampling=sampling)
    with grpc.insecure_channel(cluster.router_address) as ch, pytest.raises(grpc.RpcError) as ei:
        list(client_pb2_grpc.GenerateStub(ch).Generate(req, timeout=30))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in ei.value.details()


def test_sdk_refuses_complete_with_several_choices(client):
    with pytest.raises(InvalidRequestError, match="complete_choices"):
        client.complete("hi", n=2, temperature=1.0)


def test_cancel_mid_stream_frees_every_choice(cluster, client):
    _wait_baseline(cluster)
    s = client.generate(PROMPT, replace(PARAMS, max_tokens=400))
    it = iter(s)
    for _ in range(6):
        next(it)
    assert worker_stats(cluster.workers["decode-0"]).kv_blocks_used > 0
    s.cancel()
    assert list(it) == []
    _wait_baseline(cluster)


def test_decode_worker_killed_mid_stream_group_is_redispatched_exactly(cluster, client, whole):
    params = replace(PARAMS, max_tokens=48, logprobs=None, seed=77)
    ref = whole.generate_choices(PROMPT, params)
    victim = "decode-group-victim"
    _add_big_decode_worker(cluster, victim)
    before = _redispatches(cluster)
    ids: dict[int, list[int]] = {0: [], 1: [], 2: []}
    text: dict[int, list[str]] = {0: [], 1: [], 2: []}
    fins = {}
    killed = False
    for c in client.generate(PROMPT, params):
        ids[c.choice_index] += c.token_ids
        text[c.choice_index].append(c.text)
        if c.finish is not None:
            fins[c.choice_index] = c.finish
        if not killed and sum(map(len, ids.values())) >= 9:
            assert worker_stats(cluster.workers[victim]).num_running == 3  # the group runs there
            cluster.kill(victim)
            killed = True
    assert killed and sorted(fins) == [0, 1, 2]
    for i in range(3):
        assert ids[i] == ref[i].token_ids, i
        assert "".join(text[i]) == ref[i].text
        assert fins[i].completion_tokens == params.max_tokens
    assert _redispatches(cluster) == before + 1
    _wait_baseline(cluster)


def test_async_client_complete_choices(cluster, whole):
    import asyncio

    from pdserve.client import AsyncClient

    params = replace(PARAMS, max_tokens=6, logprobs=None, n=2, seed=9)

    async def go():
        async with AsyncClient(cluster.router_address, timeout=120) as ac:
            return await ac.complete_choices(PROMPT, params)

    got = asyncio.run(go())
    assert [g.token_ids for g in got] == [r.token_ids for r in whole.generate_choices(PROMPT, params)]
