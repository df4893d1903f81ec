"""The router refuses a request that no decode worker's KV pool could hold, before it is prefilled
(router/pool_fit.py), with the engine's own arithmetic (engine/kv_fit.py). Before, such a request
was prefilled, adopted nowhere, and a streamed one got its first token before the error."""

from __future__ import annotations

import asyncio

import pytest

from engine.config import EngineConfig
from engine.kv_fit import PoolShape
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError
from pdserve.worker_base import Role, WorkerConfig, WorkerState
from router.policy import InstanceRole
from router.pool_fit import PoolFit, check_fits
from router.quarantine import QuarantineReason
from router.registry import Registry, WorkerKind, WorkerLoad
from router.registry_service import load_from_proto
from tests.unit.test_router_redispatch import PROMPT, FakeContext, _cluster, _request, reference


def _load(blocks: int, max_model_len: int = 512, window: int = 0) -> WorkerLoad:
    return WorkerLoad(0, 0, blocks, 0, block_size=16, max_model_len=max_model_len, sliding_window=window)


def test_pool_shape_by_hand() -> None:
    full = PoolShape(4, 16, 512)  # 64 tokens
    assert full.fits(40, 24) and not full.fits(40, 25)  # 64 tokens: 4 blocks; 65: 5
    assert full.peak_blocks(40, 30) == 5
    assert PoolShape(4, 16, 60).fits(40, 1000)  # the context (60 tokens) ends it first
    windowed = PoolShape(4, 16, 512, sliding_window=16)  # 1 window block + 2 edges = 3 held at most
    assert windowed.fits(40, 400) and windowed.peak_blocks(40, 400) == 3
    assert not windowed.fits(70, 1)  # the prompt itself (71 tokens: 5 blocks) does not fit
    assert PoolShape(4, 16, 512).peak_blocks(100, 50, prefill_only=True) == 7


@pytest.mark.parametrize("blocks", [3, 4, 6])
def test_the_engine_refuses_exactly_what_the_shape_refuses(tiny_models, blocks) -> None:
    eng = LLMEngine.from_pretrained(
        tiny_models["llama"], EngineConfig(num_kv_blocks=blocks, block_size=16, enable_prefix_caching=False)
    )
    shape = eng.scheduler.pool_shape()
    assert shape == PoolShape(blocks, 16, eng.max_model_len)
    for prompt in (10, 31, 32, 47, 64, 95):
        for max_tokens in (1, 16, 17, 40, 100):
            rid = f"{prompt}-{max_tokens}"
            try:
                eng.add_request(rid, [5] * prompt, SamplingParams(max_tokens=max_tokens))
                accepted = True
                eng.abort(rid)
            except InvalidRequestError:
                accepted = False
            assert accepted == shape.fits(prompt, max_tokens), (prompt, max_tokens)


def test_check_fits_names_the_blocks_and_the_largest_pool() -> None:
    shapes = (PoolShape(4, 16, 512), PoolShape(3, 16, 512))
    check_fits(shapes, 40, 24)  # fits the larger one
    with pytest.raises(InvalidRequestError, match=r"plus max_tokens 30 needs 5 KV blocks.*largest: 4 x 16"):
        check_fits(shapes, 40, 30)
    with pytest.raises(
        InvalidRequestError, match=r"prompt of 70 tokens needs more KV blocks than any decode"
    ):
        check_fits(shapes, 70, 1)
    check_fits(None, 10_000, 10_000)  # a worker's shape unknown: nothing refused here
    check_fits((), 10_000, 10_000)  # no decode worker: placement says so


def test_pool_fit_follows_the_registered_decode_workers() -> None:
    reg = Registry(heartbeat_timeout_s=1e9)
    fit = PoolFit(reg, "m")
    fit.check(10_000, 10_000)  # no decode worker yet: not this check's refusal
    reg.register("p0", WorkerKind.PREFILL, "p0", "m", _load(1000))  # prefill pools do not count
    reg.register("d0", WorkerKind.DECODE, "d0", "m", _load(4))
    reg.register("x0", WorkerKind.DECODE, "x0", "other-model", _load(1000))  # another model's
    with pytest.raises(InvalidRequestError, match="needs 5 KV blocks"):
        fit.check(40, 30)
    fit.check(40, 24)
    reg.quarantine("d0", QuarantineReason.STALLED_DECODE)
    with pytest.raises(InvalidRequestError):  # quarantined, it still bounds what could ever run
        fit.check(40, 30)
    reg.register("d1", WorkerKind.DECODE, "d1", "m", _load(8))  # a larger pool joins: summary redone
    fit.check(40, 30)
    reg.deregister("d1")
    with pytest.raises(InvalidRequestError):
        fit.check(40, 30)
    reg.register("d2", WorkerKind.DECODE, "d2", "m", WorkerLoad(0, 0, 4, 0, block_size=16))  # no shape
    fit.check(40, 30)  # it might hold it: left to the worker


def test_a_worker_reports_its_shape_in_its_stats(tiny_models) -> None:
    ecfg = EngineConfig(num_kv_blocks=4, block_size=16, enable_prefix_caching=False)
    eng = LLMEngine.from_pretrained(tiny_models["llama"], ecfg)
    st = WorkerState(
        WorkerConfig("d0", Role.DECODE, str(tiny_models["llama"]), "127.0.0.1:1", engine=ecfg), eng
    )
    try:
        s = st.stats()
        assert (s.kv_blocks_total, s.kv_layout.block_size) == (4, 16)
        assert (s.max_model_len, s.sliding_window) == (eng.max_model_len, 0)
        reg = Registry(heartbeat_timeout_s=1e9)
        reg.register("d0", WorkerKind.DECODE, "d0", "m", load_from_proto(s))
        with pytest.raises(InvalidRequestError, match="needs 5 KV blocks"):
            PoolFit(reg, "m").check(40, 30)
    finally:
        st.loop.stop()


def test_the_router_refuses_before_any_prefill(smollm_path) -> None:
    svc, workers, store, _ = _cluster(str(smollm_path), {"p0": None}, {"d0": None})
    svc.registry.register("d0", WorkerKind.DECODE, "d0", "m", _load(1))  # 16 tokens
    ctx = FakeContext()
    with pytest.raises(InvalidRequestError, match=r"prompt of 6 tokens plus max_tokens 12 needs 2 KV blocks"):
        asyncio.run(svc.Generate(_request(max_tokens=12), ctx))
    assert workers["p0"].calls == [] and workers["d0"].calls == [] and ctx.written == []
    assert store.leases == set()
    ok = FakeContext()
    asyncio.run(svc.Generate(_request(max_tokens=9), ok))  # 6 + 9 = 15 tokens: one block
    assert [t for r in ok.written for t in r.token_ids] == reference(PROMPT, 9)


def test_pool_fit_holders_only_when_pools_differ() -> None:
    reg = Registry(heartbeat_timeout_s=1e9)
    fit = PoolFit(reg, "m")
    reg.register("d0", WorkerKind.DECODE, "d0", "m", _load(4))
    reg.register("d1", WorkerKind.DECODE, "d1", "m", _load(4))
    assert fit.holders(40, 30) is None  # alike: check() decides for all
    reg.register("d2", WorkerKind.DECODE, "d2", "m", _load(64))
    assert fit.holders(40, 30) == {"d2"} and fit.holders(40, 20) == {"d0", "d1", "d2"}


def test_a_mixed_cluster_places_each_request_on_a_pool_that_holds_it(smollm_path) -> None:
    """Decode pools of 1 and 64 blocks: a request of 6 + 12 tokens (2 blocks) goes to the large one
    every time, although least-loaded placement prefers the small one (as many free blocks now,
    fewer requests running),
    which would refuse it."""
    svc, workers, store, _ = _cluster(str(smollm_path), {"p0": None}, {"a-small": None, "z-big": None})
    svc.registry.register("a-small", WorkerKind.DECODE, "a-small", "m", _load(1))
    busy = WorkerLoad(0, 40, 64, 63, block_size=16, max_model_len=512)  # 40 running, 1 block free
    svc.registry.register("z-big", WorkerKind.DECODE, "z-big", "m", busy)
    for _ in range(3):
        ctx = FakeContext()
        asyncio.run(svc.Generate(_request(max_tokens=12), ctx))
        assert [t for r in ctx.written for t in r.token_ids] == reference(PROMPT, 12)
    assert workers["a-small"].calls == [] and len(workers["z-big"].calls) == 3
    assert store.leases == set()


def test_a_redispatch_in_a_mixed_cluster_goes_to_a_pool_that_holds_it(smollm_path) -> None:
    """The decode worker streaming a 2-block request dies; its replacement is the busy large pool,
    not the small one least-loaded placement prefers (which would refuse the resumed request)."""
    svc, workers, store, _ = _cluster(
        str(smollm_path), {"p0": None}, {"big-dies": 3, "a-small": None, "z-big": None}
    )
    svc.registry.register("big-dies", WorkerKind.DECODE, "big-dies", "m", _load(64))
    svc.registry.register("a-small", WorkerKind.DECODE, "a-small", "m", _load(1))
    busy = WorkerLoad(0, 40, 64, 63, block_size=16, max_model_len=512)
    svc.registry.register("z-big", WorkerKind.DECODE, "z-big", "m", busy)
    ctx = FakeContext()
    asyncio.run(svc.Generate(_request(max_tokens=12), ctx))
    assert [t for r in ctx.written for t in r.token_ids] == reference(PROMPT, 12)
    assert len(workers["big-dies"].calls) == 1 and workers["a-small"].calls == []
    assert len(workers["z-big"].calls) == 1


def test_a_mixed_prefill_cluster_prefills_on_a_pool_that_holds_the_prompt(smollm_path) -> None:
    """Prefill pools of 1 block (16 tokens) and 64: a 40-token prompt is prefilled on the large one,
    although least-loaded placement prefers the small one; with no prefill pool large enough the
    placement is not narrowed to nothing (the chosen worker refuses the prompt itself)."""
    svc, workers, store, _ = _cluster(str(smollm_path), {"a-small": None, "z-big": None}, {"d0": None})
    svc.registry.register("a-small", WorkerKind.PREFILL, "a-small", "m", _load(1))
    svc.registry.register(
        "z-big", WorkerKind.PREFILL, "z-big", "m", WorkerLoad(3, 40, 64, 63, block_size=16, max_model_len=512)
    )
    svc.registry.register("d0", WorkerKind.DECODE, "d0", "m", _load(64))
    assert svc.prefill_fit.holders(40, 5) == {"z-big"} and svc.prefill_fit.holders(10, 5) == {
        "a-small",
        "z-big",
    }
    long_prompt = [7] * 40
    req = _request(max_tokens=5)
    req.prompt_token_ids.ids[:] = long_prompt
    ctx = FakeContext()
    asyncio.run(svc.Generate(req, ctx))
    assert [t for r in ctx.written for t in r.token_ids] == reference(long_prompt, 5)
    assert workers["a-small"].calls == [] and len(workers["z-big"].calls) == 1
    assert store.leases == set()
    view = svc._views.build(svc.registry, "m", svc.outstanding, svc.kv_tokens)
    ids = lambda v, role: sorted(i.instance_id for i in v.instances if i.role is role)  # noqa: E731
    assert ids(svc.placer._holding(view, 40, 5), InstanceRole.PREFILL) == ["z-big"]
    # a prompt no prefill pool holds: not narrowed to nothing (the chosen worker refuses it itself)
    assert ids(svc.placer._holding(view, 2000, 5), InstanceRole.PREFILL) == ["a-small", "z-big"]


# ---------------------------------------------------------------- parallel-sampling groups
@pytest.mark.parametrize("blocks", [4, 6])
def test_adopts_group_is_the_engines_check(tiny_models, blocks) -> None:
    """``PoolShape.adopts_group`` (the router's) says yes exactly when the engine's
    ``check_group_fits`` for the handed-off prefix (every prompt token but the last) does."""
    eng = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(num_kv_blocks=blocks, block_size=16))
    shape = eng.scheduler.pool_shape()
    for prompt in (2, 16, 17, 33, 48, 49, 80):
        for k in (2, 3, 4, 6):
            try:
                eng.check_group_fits(prompt - 1, k)
                engine_says = True
            except InvalidRequestError:
                engine_says = False
            assert shape.adopts_group(prompt, k) == engine_says, (prompt, k)
    assert PoolShape(4, 16, 512).adopts_group(33, 2)  # 2 prefix blocks + 2 choices
    assert not PoolShape(4, 16, 512).adopts_group(34, 2)  # 33 prefix tokens: 3 blocks + 2


def _group_request(n: int, prompt_len: int) -> tuple[SamplingParams, object]:
    from pdserve.proto_convert import sampling_from_proto

    req = _request(max_tokens=2, n=n)
    req.sampling.temperature = 0.8
    req.sampling.seed = 5
    req.prompt_token_ids.ids[:] = [7] * prompt_len
    return sampling_from_proto(req.sampling), req


def test_a_group_no_decode_pool_could_adopt_runs_whole_on_the_decode_worker(smollm_path) -> None:
    """A decode pool of 4 blocks adopts a handed-off 3-choice group over a 33-token prompt
    (2 prefix blocks + 3 > 4: no), though it runs the request alone (34 + 2 tokens: 3 blocks):
    the router places the group there with a local prefill instead of prefilling it for a handoff
    the worker would refuse. A group it could adopt keeps the disaggregated placement; so does a
    worker that reports no pool shape (it checks itself)."""
    from router.groups import placement_args

    svc, _, _, _ = _cluster(str(smollm_path), {"p0": None}, {"d0": None})
    svc.registry.register("d0", WorkerKind.DECODE, "d0", "m", _load(4))
    ids = [7] * 33
    params, req = _group_request(3, 33)
    placement, pw, dw, _ = svc.placer.place("g1", ids, *placement_args(params, req), 0, candidates=3)
    assert placement.local_prefill and pw is dw and dw.worker_id == "d0"
    assert placement.instance_id == placement.decode_instance_id == "d0"
    svc.policy.release("g1")
    params2, req2 = _group_request(2, 33)  # 2 + 2 = 4 blocks: adopted
    placement, pw, dw, _ = svc.placer.place("g2", ids, *placement_args(params2, req2), 0, candidates=2)
    assert not placement.local_prefill and pw.worker_id == "p0" and dw.worker_id == "d0"
    svc.policy.release("g2")
    placement, _, _, _ = svc.placer.place("s1", ids, *placement_args(params, req), 0)  # not a group
    assert not placement.local_prefill
    svc.policy.release("s1")
    svc.registry.register("d0", WorkerKind.DECODE, "d0", "m", WorkerLoad(0, 0, 4, 0, block_size=16))
    placement, _, _, _ = svc.placer.place("g3", ids, *placement_args(params, req), 0, candidates=3)
    assert not placement.local_prefill  # no shape reported: the worker decides
    svc.policy.release("g3")
