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
  only without memory pressure (no preemption, asserted), not here."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.spec_decode import SpecMethod, SpeculativeConfig
from engine.spec_decode.config import DraftAcceptance
from pdserve.client import Client
from pdserve.errors import UnavailableError
from pdserve.launcher import ClusterSpec, LocalCluster, launch, wait_router_ready
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


def _metric(cl: LocalCluster, worker: str, name: str) -> float:
    """A counter of ``worker``'s /metrics (its sample ``name``, summed over labels)."""
    with urllib.request.urlopen(f"http://{cl.metrics[worker]}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


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
