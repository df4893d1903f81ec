"""LoRA adapters through the chunk-wise KV-streaming handoff (issues #14 and #16): in-process
routers with ``kv_stream`` = store and grpc in front of two prefill and two decode workers that
all serve two random PEFT adapters ("sql", "chat") on the tiny random Llama (kv_stream_cluster's
:class:`Cluster` with ``lora``; 32-token prefill chunks). Four 200-token requests at once per mode
(an adapter greedy, the other adapter seeded, and the base model on the same two prompts):

* each output equals the engine run whole with that adapter (the base model's: the base engine),
  and the adapter outputs differ from the base model's on the same prompt (the adapter mattered);
* each request's KV really went by a stream, chunk-wise: the prefill worker opened one stream per
  request, of several chunks (at most 7 for 200 tokens), inline for grpc and store handles for store,
  whose block keys are the prompt's chained hashes *with the request's adapter* (a chunk keyed
  with another adapter, or none, would be refused by the decode worker or served wrongly);
* the prefill workers computed exactly the adapter requests' prompts with those adapters (their
  per-adapter prefill-token counters, adapters in an engine slot), and the decode workers decoded
  with them without computing any prompt token again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.block_hash import chain_hashes
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import AdapterSpec, LoRAConfig
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.worker_base import adapter_snapshots
from router.lifecycle.stream_mode import KVStreamMode
from tests.integration.kv_stream_cluster import (  # noqa: F401 - the module's fixtures
    BLOCK_SIZE,
    BLOCKS,
    CALL_S,
    CHUNK,
    GREEDY,
    SEEDED,
    Cluster,
    model_path,
    seeded_prompt,
    whole,
)
from tests.lora_adapters import make_adapter

N_PROMPT = 200  # 7 prefill chunks of 32 tokens


@pytest.fixture(scope="module")
def lora(model_path, tmp_path_factory) -> LoRAConfig:  # noqa: F811
    root = tmp_path_factory.mktemp("kvs-lora")
    sql = make_adapter(
        model_path, root / "sql", r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"], seed=3
    )
    chat = make_adapter(
        model_path, root / "chat", r=4, alpha=8, targets=["k_proj", "o_proj", "up_proj"], seed=7
    )
    return LoRAConfig((AdapterSpec("sql", str(sql)), AdapterSpec("chat", str(chat))))


class _Recorder:
    """Every streamed Prefill the prefill workers get (request id -> its prompt, adapter and
    cache salt) and every KV stream they open (request id -> the stream, which keeps its chunks'
    descriptions after the decode worker consumed them)."""

    def __init__(self, cluster: Cluster) -> None:
        self.prefills: dict[str, tuple[list[int], str, str]] = {}
        self.streams: dict[str, object] = {}
        for p in cluster.prefill.values():
            streamed, reg = p._prefill_streamed, p.streams
            opener = reg.open

            def prefill_streamed(req, *a, _run=streamed, **kw):
                self.prefills[req.request_id] = (list(req.prompt_token_ids), req.adapter, req.cache_salt)
                return _run(req, *a, **kw)

            def open_(request_id, *a, _open=opener, **kw):
                s = _open(request_id, *a, **kw)
                self.streams[request_id] = s
                return s

            p._prefill_streamed = prefill_streamed
            reg.open = open_  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def cluster(model_path, lora):  # noqa: F811
    cl = Cluster(model_path, lora=lora)
    cl.recorder = _Recorder(cl)  # type: ignore[attr-defined]
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def whole_lora(model_path, lora) -> LLMEngine:  # noqa: F811
    """The engine run whole with both adapters (the reference)."""
    return LLMEngine.from_pretrained(
        model_path, EngineConfig(num_kv_blocks=BLOCKS, block_size=BLOCK_SIZE), lora=lora
    )


def _run_whole(engine: LLMEngine, prompt: list[int], params: SamplingParams, adapter: str) -> list[int]:
    rid = engine.add_request(None, prompt, params, adapter_id=adapter)
    toks: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                toks = list(o.token_ids)
    return toks


def _counters(cluster: Cluster, names: tuple[str, ...]) -> dict[str, dict[str, tuple[int, int]]]:
    """Per worker of ``names``: adapter -> (prefill tokens, decode tokens) computed with it."""
    return {
        n: {
            a.name: (a.prefill_tokens, a.decode_tokens)
            for a in cluster.states[n].loop.call(adapter_snapshots)
        }
        for n in names
    }


def _delta(before, after, adapter: str, which: int) -> int:
    return sum(after[n][adapter][which] - before[n][adapter][which] for n in after)


PREFILL, DECODE = ("pre-a", "pre-b"), ("dec-a", "dec-b")


@pytest.mark.parametrize(
    ("mode", "greedy_adapter", "seeded_adapter"),
    [(KVStreamMode.STORE, "sql", "chat"), (KVStreamMode.GRPC, "chat", "sql")],
    ids=["store", "grpc"],
)
def test_streamed_adapter_requests_equal_the_engine_with_the_adapter(
    cluster,
    whole,  # noqa: F811
    whole_lora,
    mode,
    greedy_adapter,
    seeded_adapter,
) -> None:
    seed = 11 if mode is KVStreamMode.STORE else 12
    pa, pb = seeded_prompt(N_PROMPT, seed), seeded_prompt(N_PROMPT, seed + 100)
    # (prompt, params, adapter): each adapter, and the base model on the same prompt
    reqs = [(pa, GREEDY, greedy_adapter), (pb, SEEDED, seeded_adapter), (pa, GREEDY, ""), (pb, SEEDED, "")]
    refs = [_run_whole(whole_lora, p, sp, a) for p, sp, a in reqs]
    base_refs = [_run_whole(whole, p, sp, "") for p, sp, _ in reqs[2:]]
    assert refs[2:] == base_refs  # the LoRA engine with no adapter is the base engine
    assert refs[0] != refs[2] and refs[1] != refs[3]  # each adapter changes its prompt's output

    cluster.wait_clean()
    rec = cluster.recorder
    opened, known = cluster.streams_opened(), set(rec.streams)
    pre_before, dec_before = _counters(cluster, PREFILL), _counters(cluster, DECODE)
    with Client(cluster.address(mode), timeout=CALL_S) as c, ThreadPoolExecutor(len(reqs)) as ex:
        got = list(ex.map(lambda r: c.complete(r[0], r[1], adapter=r[2]), reqs))
    pre_after, dec_after = _counters(cluster, PREFILL), _counters(cluster, DECODE)

    for (_, _, a), r, g in zip(reqs, refs, got, strict=True):
        assert g.token_ids == r, f"adapter {a!r}: streamed output != the engine whole"
        assert g.finish.reason == "length" and g.finish.completion_tokens == 16

    # every handoff went by a stream of several chunks, keyed with the request's adapter
    assert cluster.streams_opened() == opened + len(reqs)
    new = {r: s for r, s in rec.streams.items() if r not in known}
    assert len(new) == len(reqs) and set(new) <= set(rec.prefills)
    model_id = cluster.states["pre-a"].engine.model_id
    max_chunks = -(-N_PROMPT // CHUNK)
    for p, _, a in reqs:
        (rid,) = [r for r in new if rec.prefills[r][:2] == (p, a)]  # one streamed Prefill each
        salt = rec.prefills[rid][2]  # the router's cache salt (the default tenant's)
        s = new[rid]
        keys = chain_hashes(p, BLOCK_SIZE, model_id, a, salt, include_partial=True)
        # chunk-wise: published as the prefill went (up to one chunk per 32-token engine step;
        # fewer when a snapshot finds several steps' blocks final), all 13 blocks
        m = s.manifest()
        assert 2 <= m.ready_chunks <= max_chunks and m.ready_blocks == len(keys), m
        assert [h for c in s._chunks for h in c.block_hashes] == keys, f"stream not keyed with {a!r}"
        for ch in s._chunks:
            if mode is KVStreamMode.GRPC:
                assert ch.blocks is not None and ch.handle is None
            else:
                assert ch.handle is not None and ch.blocks is None

    # the prefill workers computed each adapter request's prompt with its adapter (once: no
    # re-dispatch), the decode workers decoded with it and computed no prompt token again
    for a in ("sql", "chat"):
        assert _delta(pre_before, pre_after, a, 0) == N_PROMPT, a
        assert _delta(dec_before, dec_after, a, 0) == 0, a
        assert _delta(dec_before, dec_after, a, 1) >= 15, a
    in_slot = {a for n in PREFILL for a in cluster.states[n].stats().adapters_in_slot}
    assert in_slot == {"sql", "chat"}
    cluster.wait_clean()
