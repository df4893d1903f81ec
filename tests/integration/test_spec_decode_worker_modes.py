"""Speculative decoding on a launched decode worker (#17), the modes test_spec_decode_cluster.py
does not run there: ``--speculative-acceptance rejection``, and speculation on a KV pool small
enough that requests are preempted, recomputed (hitting the worker's prefix cache) and resumed.

Disaggregated as in test_spec_decode_cluster (its tiny target and noisy draft models, prompts and
sampling parameters, and its helpers): client (SDK) -> router -> prefill worker -> store ->
decode worker. One cluster for the module, launched without speculation; each test restarts the
decode worker with the flags of its mode (the prefill worker only computes prompts, which
speculation does not change).

* A worker asked for rejection acceptance with prompt-lookup drafting does not start: it exits
  before its ready line, naming ``--speculative-acceptance rejection`` and what it needs.
* ``--speculative-draft-model D --speculative-acceptance rejection``: a seeded request decodes
  exactly as an engine in this process with the same SpeculativeConfig (rejection acceptance) run
  whole, token for token and text, keeping and drafting exactly its drafts (WorkerStats
  ``spec_accepted_tokens_total`` / ``spec_draft_tokens_total``), some rejected; its seeded output
  is not the non-speculative one (the default coupled acceptance would give exactly that: a worker
  that ignored the flag fails), greedy still is. Rejection sampling is a function of the request's
  seed, the models, ``k`` and the drafts each step verified, so requests go one at a time (the
  draft model's proposals could depend on the batch its forward passes ran in).
* ``--kv-blocks 10`` with the draft model (coupled acceptance), steps paced so that the four
  requests overlap: the decode worker preempts (WorkerStats ``num_preempted``), recomputes the
  preempted requests (its ``prefill_tokens_computed_total`` grows: it computed none of their
  prompts at first), finding blocks of their own in its prefix cache (``prefix_cache_hit_rate``
  and ``pdserve_worker_prefix_cache_hits_total`` above 0: the decode worker's prefix cache is
  queried only when a preempted request comes back), keeps drafts, and every output, greedy and
  seeded, is the non-speculative engine's run whole; no block stays referenced afterwards.
  Under rejection acceptance a seeded output depends on how many drafts each step had room for
  and on recomputes (:class:`engine.spec_decode.config.DraftAcceptance`), so it is compared
  only without memory pressure (no preemption, asserted), not here.
* The same pool and pacing drafting by prompt lookup (``--speculative-tokens K
  --speculative-ngram N``): preempted and recomputed requests, drafts proposed and kept, every
  output the non-speculative engine's.
* The same pool with a host swap pool (``--swap-space``) and the draft model: preempted requests
  swapped out and back in (``pdserve_worker_swaps_total``), drafts kept, every output the
  non-speculative engine's, neither pool holding a block afterwards; each run swaps, the first
  included (until it measures a prefill, the worker prices a recompute at its decode steps' rate).
* Rejection acceptance with the four seeded requests running batched (no memory pressure): each
  output is the engine's with the same config, which is the same batched as one at a time
  (asserted): its randomness is per request, seed and output index."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading
import urllib.request
from dataclasses import replace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.spec_decode import SpecMethod, SpeculativeConfig
from engine.spec_decode.config import DraftAcceptance
from pdserve.client import Client
from pdserve.errors import UnavailableError
from pdserve.launcher import ClusterSpec, LocalCluster, launch, wait_router_ready
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from tests.integration import test_spec_decode_cluster as sdc
from tests.integration.clusters import paced_workers

K = sdc.K
DECODE = "decode-0"
SMALL_POOL = 10  # blocks of 16: one request alone fits (<= 6), the four together (up to 20) do not
PREEMPT_MAX_TOKENS = 48

# the shared fixtures of test_spec_decode_cluster: its models and the engine run whole without
# speculation (module-scoped here: built once for this module)
models = sdc.models
plain = sdc.plain


@pytest.fixture(scope="module")
def cluster(models):
    cl = launch(
        ClusterSpec(
            model_path=str(models["target"]),
            worker_kv_blocks=256,
            store_capacity_blocks=512,
            router_args=("--local-prefill-max-tokens", "0"),
        )
    )
    cl.base_decode_argv = list(cl.argv[DECODE])  # the decode worker's flags without speculation
    yield cl
    cl.stop()


def _restart_decode(
    cl: LocalCluster, *flags: str, kv_blocks: int | None = None, min_step_s: float | None = None
) -> dict:
    """Restart the decode worker with its launch flags plus ``flags`` (``kv_blocks``: its KV pool
    instead; ``min_step_s``: its engine steps paced to at least that long) and wait until the
    router places requests again (the router may have dropped the worker while it was down: a
    probe request of 2 tokens); its ready line. UnavailableError (the cluster left running) when
    it does not start."""
    argv = list(cl.base_decode_argv)
    if kv_blocks is not None:
        argv[argv.index("--kv-blocks") + 1] = str(kv_blocks)
    cl.argv[DECODE] = [*argv, *flags]
    cl.kill(DECODE)
    with paced_workers(min_step_s) if min_step_s else contextlib.nullcontext():
        info = cl.restart(DECODE, stop_on_failure=False)
    wait_router_ready(cl, cl.router_address, 60.0)
    return info


def _draft_flags(models, acceptance: DraftAcceptance) -> tuple[str, ...]:
    return (
        "--speculative-tokens",
        str(K),
        "--speculative-draft-model",
        str(models["draft"]),
        "--speculative-acceptance",
        acceptance.value,
    )


def _draft_spec(models, acceptance: DraftAcceptance) -> SpeculativeConfig:
    return SpeculativeConfig(
        method=SpecMethod.DRAFT_MODEL,
        draft_model=str(models["draft"]),
        num_speculative_tokens=K,
        acceptance=acceptance,
    )


def _metric(cl: LocalCluster, worker: str, name: str, **labels: str) -> float:
    """A sample of ``worker``'s /metrics: ``name`` with ``labels``, summed over its other labels."""
    with urllib.request.urlopen(f"http://{cl.metrics[worker]}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_rejection_acceptance_with_prompt_lookup_is_refused_at_start(cluster, plain) -> None:
    """Rejection acceptance is for draft-model drafts only: a decode worker given it with
    prompt-lookup drafting exits before it is ready, naming the flag; restarted without it, the
    same worker serves."""
    with pytest.raises(UnavailableError) as e:
        _restart_decode(cluster, "--speculative-tokens", str(K), "--speculative-acceptance", "rejection")
    msg = str(e.value)
    assert f"{DECODE} exited with status 2 before it was ready" in msg, msg
    assert "--speculative-acceptance rejection needs --speculative-draft-model" in msg, msg
    assert cluster.procs[DECODE].poll() == 2
    _restart_decode(cluster, "--speculative-tokens", str(K))
    with Client(cluster.router_address, timeout=60) as c:
        got = c.complete(sdc.PROMPTS[0], sdc.GREEDY)
    (ref,) = plain.generate([sdc.PROMPTS[0]], sdc.GREEDY)
    assert got.token_ids == ref.token_ids


def test_rejection_acceptance_seeded_equals_the_engine_with_the_same_config(cluster, models, plain) -> None:
    """The decode worker with --speculative-acceptance rejection: every request (one at a time)
    decodes what an engine here with the same draft model, k and rejection acceptance decodes run
    whole, keeping and drafting exactly its drafts; the seeded ones differ from the
    non-speculative output (the coupled rule's), greedy does not."""
    _restart_decode(cluster, *_draft_flags(models, DraftAcceptance.REJECTION))
    rej = sdc._engine(models["target"], _draft_spec(models, DraftAcceptance.REJECTION))
    params = [*sdc.SEEDED[:3], sdc.GREEDY]
    drafted_before = rej.stats().spec_draft_tokens
    want, want_accepted = sdc._whole(rej, params, together=False)
    want_drafted = rej.stats().spec_draft_tokens - drafted_before
    ref, _ = sdc._whole(plain, params)
    seeded = [i for i, sp in enumerate(params) if not sp.greedy]
    differ = [i for i in seeded if want[i].token_ids != ref[i].token_ids]
    assert differ, "rejection acceptance gave the non-speculative output for every seeded request"
    assert all(want[i].token_ids == ref[i].token_ids for i, sp in enumerate(params) if sp.greedy)
    assert 0 < want_accepted < want_drafted

    before = sdc._stats(cluster, DECODE)
    with Client(cluster.router_address, timeout=120, direct=True) as c:
        got = [c.complete(p, sp) for p, sp in zip(sdc.PROMPTS, params, strict=True)]
    after = sdc._stats(cluster, DECODE)
    sdc.assert_same_outputs(plain.tokenizer, want, got, params)
    accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    drafted = after.spec_draft_tokens_total - before.spec_draft_tokens_total
    assert (accepted, drafted) == (want_accepted, want_drafted)
    assert after.decode_tokens_total - before.decode_tokens_total == sum(len(w.token_ids) - 1 for w in want)
    assert after.num_preempted == before.num_preempted == 0


def test_preempted_and_resumed_while_speculating_equals_the_whole_engine(cluster, models, plain) -> None:
    """A decode worker of 10 KV blocks drafting with the draft model (coupled acceptance), its
    steps paced so that the four requests overlap: it preempts, recomputes the preempted requests
    with hits in its prefix cache, keeps drafts, and every output (greedy, then seeded) is the
    non-speculative engine's run whole; afterwards no block is referenced."""
    info = _restart_decode(
        cluster, *_draft_flags(models, DraftAcceptance.COUPLED), kv_blocks=SMALL_POOL, min_step_s=0.02
    )
    assert info
    start = sdc._stats(cluster, DECODE)
    assert start.kv_blocks_total == SMALL_POOL and start.num_preempted == 0
    assert start.prefix_cache_hit_rate == 0.0
    total_preempted = 0
    for params in (
        [replace(sdc.GREEDY, max_tokens=PREEMPT_MAX_TOKENS)] * len(sdc.PROMPTS),
        [replace(sp, max_tokens=PREEMPT_MAX_TOKENS) for sp in sdc.SEEDED],
    ):
        ref, _ = sdc._whole(plain, params)
        decoded = sum(len(r.token_ids) - 1 for r in ref)
        before = sdc._stats(cluster, DECODE)
        with (
            Client(cluster.router_address, timeout=120, direct=True) as c,
            cf.ThreadPoolExecutor(len(sdc.PROMPTS)) as ex,
        ):
            got = list(ex.map(lambda a: c.complete(*a), zip(sdc.PROMPTS, params, strict=True)))
        after = sdc._stats(cluster, DECODE)
        sdc.assert_same_outputs(plain.tokenizer, ref, got, params)
        preempted = after.num_preempted - before.num_preempted
        recomputed = after.prefill_tokens_computed_total - before.prefill_tokens_computed_total
        assert preempted > 0, f"no preemption on a pool of {SMALL_POOL} blocks"
        assert recomputed > 0, "preempted requests were not recomputed on the decode worker"
        accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
        assert 0 < accepted <= after.spec_draft_tokens_total - before.spec_draft_tokens_total
        # a recomputed request's next token comes from its recompute (a prefill step), every other
        # one from a decode step: at most one token per preemption is not a decode token
        dec = after.decode_tokens_total - before.decode_tokens_total
        assert decoded - preempted <= dec < decoded, (decoded, dec, preempted)
        total_preempted += preempted
    end = sdc._stats(cluster, DECODE)
    assert end.prefix_cache_hit_rate > 0.0, "no resumed request found its blocks in the prefix cache"
    assert _metric(cluster, DECODE, "pdserve_worker_prefix_cache_hits_total") > 0
    assert end.kv_blocks_used == 0 and end.num_running == 0 and end.num_waiting == 0
    assert end.num_preempted == total_preempted


# --------------------------------------------------------------- the review's three combinations
NGRAM_FLAGS = ("--speculative-tokens", str(K), "--speculative-ngram", str(sdc.NGRAM))
# the decode worker's host swap pool: 0.0005 GiB = 65 blocks of 8 KiB (the tiny Llama's: 2 layers
# x K, V x 16 tokens x 2 KV heads x 16 dims x fp32), room for every request of a run swapped out
SWAP_GIB = "0.0005"


def _together(cl: LocalCluster, params: list, want: list, tok) -> tuple:
    """PROMPTS with ``params`` sent together through the router (streamed directly by the decode
    worker), each output ``want``'s (:func:`sdc.assert_same_outputs`); the decode worker's
    WorkerStats before and after, and the most requests it ran at once meanwhile (polled)."""
    before = sdc._stats(cl, DECODE)
    most = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal most
        with grpc.insecure_channel(cl.workers[DECODE]) as ch:
            stub = worker_pb2_grpc.WorkerStub(ch)
            while not stop.wait(0.005):
                most = max(most, stub.Stats(worker_pb2.StatsRequest(), timeout=30).num_running)

    with (
        Client(cl.router_address, timeout=120, direct=True) as c,
        cf.ThreadPoolExecutor(len(sdc.PROMPTS) + 1) as ex,
    ):
        watcher = ex.submit(poll)
        try:
            got = list(ex.map(lambda a: c.complete(*a), zip(sdc.PROMPTS, params, strict=True)))
        finally:
            stop.set()
        watcher.result()
    after = sdc._stats(cl, DECODE)
    sdc.assert_same_outputs(tok, want, got, params)
    return before, after, most


def _preempting_params() -> list[list]:
    """Greedy, then seeded: the four requests of 48 tokens that a pool of SMALL_POOL blocks
    cannot hold together."""
    return [
        [replace(sdc.GREEDY, max_tokens=PREEMPT_MAX_TOKENS)] * len(sdc.PROMPTS),
        [replace(sp, max_tokens=PREEMPT_MAX_TOKENS) for sp in sdc.SEEDED],
    ]


def test_preempted_while_drafting_by_prompt_lookup_equals_the_whole_engine(cluster, plain) -> None:
    """A decode worker of 10 KV blocks drafting by prompt lookup (--speculative-tokens K
    --speculative-ngram N, coupled acceptance, the only one prompt lookup takes), steps paced so
    that the four requests overlap: it preempts and recomputes requests while it drafts for them,
    keeps drafts, and every output (greedy, then seeded) is the non-speculative engine's run
    whole; afterwards no block is referenced."""
    _restart_decode(cluster, *NGRAM_FLAGS, kv_blocks=SMALL_POOL, min_step_s=0.02)
    assert sdc._stats(cluster, DECODE).kv_blocks_total == SMALL_POOL
    for params in _preempting_params():
        ref, _ = sdc._whole(plain, params)
        before, after, _ = _together(cluster, params, ref, plain.tokenizer)
        preempted = after.num_preempted - before.num_preempted
        assert preempted > 0, f"no preemption on a pool of {SMALL_POOL} blocks"
        recomputed = after.prefill_tokens_computed_total - before.prefill_tokens_computed_total
        assert recomputed > 0, "preempted requests were not recomputed on the decode worker"
        drafted = after.spec_draft_tokens_total - before.spec_draft_tokens_total
        accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
        assert 0 < accepted <= drafted, (accepted, drafted)
    end = sdc._stats(cluster, DECODE)
    assert end.kv_blocks_used == 0 and end.num_running == 0 and end.num_waiting == 0


def test_swapped_out_and_in_while_speculating_equals_the_whole_engine(cluster, models, plain) -> None:
    """A decode worker of 10 KV blocks with a host swap pool (--swap-space) drafting with the
    draft model (coupled acceptance), steps paced so that the four requests overlap: preempted
    requests are swapped out to the host and back (``pdserve_worker_swaps_total`` out and in),
    drafts are kept, and every output (greedy, then seeded) is the non-speculative engine's run
    whole; afterwards neither the device pool nor the host pool holds a block.

    Each run swaps, the first included: the worker has prefilled nothing when it first preempts
    (its prompts are computed by the prefill worker), and its decode steps' rate stands in for the
    prefill rate the swap-or-recompute choice needs (``RateEstimator.observe_decode``; before, its
    first preemptions always recomputed)."""
    _restart_decode(
        cluster,
        *_draft_flags(models, DraftAcceptance.COUPLED),
        "--swap-space",
        SWAP_GIB,
        kv_blocks=SMALL_POOL,
        min_step_s=0.02,
    )
    assert _metric(cluster, DECODE, "pdserve_worker_host_kv_blocks", state="free") >= len(sdc.PROMPTS) * 6
    start = sdc._stats(cluster, DECODE)
    swaps = [_metric(cluster, DECODE, "pdserve_worker_swaps_total", direction=d) for d in ("out", "in")]
    for params in _preempting_params():
        ref, _ = sdc._whole(plain, params)
        run_outs = _metric(cluster, DECODE, "pdserve_worker_swaps_total", direction="out")
        before, after, _ = _together(cluster, params, ref, plain.tokenizer)
        assert after.num_preempted > before.num_preempted, f"no preemption on a pool of {SMALL_POOL} blocks"
        run_outs = _metric(cluster, DECODE, "pdserve_worker_swaps_total", direction="out") - run_outs
        assert run_outs > 0, f"no swap-out in {after.num_preempted - before.num_preempted} preemptions"
        drafted = after.spec_draft_tokens_total - before.spec_draft_tokens_total
        accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
        assert 0 < accepted <= drafted, (accepted, drafted)
    outs, ins = (
        _metric(cluster, DECODE, "pdserve_worker_swaps_total", direction=d) - was
        for d, was in zip(("out", "in"), swaps, strict=True)
    )
    assert outs > 0, f"no swap-out in {after.num_preempted - start.num_preempted} preemptions"
    assert ins == outs  # every swapped-out request came back
    assert _metric(cluster, DECODE, "pdserve_worker_swapped_blocks_total", direction="in") > 0
    assert after.kv_blocks_used == 0 and after.num_running == 0 and after.num_waiting == 0
    assert _metric(cluster, DECODE, "pdserve_worker_host_kv_blocks", state="used") == 0
    assert _metric(cluster, DECODE, "pdserve_worker_swapped_requests") == 0


def test_rejection_acceptance_seeded_batched_equals_the_engine_with_the_same_config(
    cluster, models, plain
) -> None:
    """The decode worker with --speculative-acceptance rejection and the draft model, its 256
    blocks holding every request (no preemption, asserted), steps paced so that the four seeded
    requests run batched (at least two at once, polled): each decodes what an engine here with the
    same SpeculativeConfig decodes run whole, keeping and drafting exactly its drafts. That engine
    gives the same outputs with the four in one batch as one at a time (asserted): rejection
    sampling draws its uniforms and residuals from each request's seed and output index, so the
    batch a step ran in does not change it (while every step gets the drafts k allows), and the
    worker's batches, which depend on arrival times, need not be the engine's."""
    _restart_decode(cluster, *_draft_flags(models, DraftAcceptance.REJECTION), min_step_s=0.02)
    rej = sdc._engine(models["target"], _draft_spec(models, DraftAcceptance.REJECTION))
    params = list(sdc.SEEDED)
    drafted_before = rej.stats().spec_draft_tokens
    want, want_accepted = sdc._whole(rej, params, together=True)
    want_drafted = rej.stats().spec_draft_tokens - drafted_before
    alone, alone_accepted = sdc._whole(rej, params, together=False)
    assert [o.token_ids for o in alone] == [o.token_ids for o in want]
    assert alone_accepted == want_accepted
    ref, _ = sdc._whole(plain, params)
    assert any(w.token_ids != r.token_ids for w, r in zip(want, ref, strict=True)), (
        "rejection acceptance gave the non-speculative output for every seeded request"
    )
    assert 0 < want_accepted < want_drafted

    before, after, most = _together(cluster, params, want, plain.tokenizer)
    assert most >= 2, f"the decode worker ran the requests one at a time (at most {most} at once)"
    accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    drafted = after.spec_draft_tokens_total - before.spec_draft_tokens_total
    assert (accepted, drafted) == (want_accepted, want_drafted)
    assert after.num_preempted == before.num_preempted
