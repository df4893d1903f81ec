"""Live migration of direct token streams (router/lifecycle/direct_legs.py ``DirectLegs.moved``,
router/lifecycle/grpc_migrator.py) with real decode workers on 127.0.0.1 serving DirectStream (the
tiny random Llama, SmolLM2's tokenizer for the router), a real SDK client taking its tokens from
the workers, and the router's own MigrateOut / ResumeStream / ResumeDirect path.

One cluster serves the module: an in-process router with direct streams (colocated placement:
each request runs whole on a decode worker, which streams every token straight to the client) and
two in-process decode workers. The tests:

* a direct stream migrated mid-way (after its client was redirected to the source and took
  tokens from it) has greedy and seeded output (tokens and text) identical to an unmigrated run,
  the client streams the rest straight from the destination (it attached there with a new
  ticket), the migration is counted, and no block stays held;
* a destination that cannot serve direct streams refuses the grant and the rest is relayed:
  output identical;
* stop strings: a migrated direct stream ends on a stop string matched on the destination, text
  identical;
* a drain empties a decode worker of its direct streams by migration while they continue, and
  they finish identical to unmigrated runs;
* (not a migration, the same cluster) a ticket outlives a decode worker's admission: a request
  whose admission waits longer than the ticket's TTL (for free blocks, under load) is still
  served, its client attached with the ticket the router granted before the wait.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.metrics import RouterMetrics
from pdserve.ticket import TicketClaims
from pdserve.v1 import client_pb2, direct_pb2
from router.drain import drain_decode_worker
from router.lifecycle.direct_legs import DirectConfig, DirectLegs
from router.lifecycle.states import State
from router.policy import PolicyKind
from router.service import GenerateServicer, RouterConfig
from tests.integration.clusters import IN_PROC_MODEL_ID, InProcCluster, random_prompt

GREEDY = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=200, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
CALL_S = 120.0
# each engine step lasts at least this long while a test acts on a running stream (migrate,
# drain): unpaced, the tiny model decodes a step in ~1.5 ms and could finish before the
# migration's MigrateOut on a loaded host. Only that window is paced (InProcCluster.paced).
PACE_S = 0.01


class _Cluster(InProcCluster):
    """The in-process router with direct streams (colocated placement, migration on) over two
    decode workers serving DirectStream; spies record each client attach and each ResumeDirect."""

    def __init__(self, path) -> None:
        super().__init__(path, direct=True)
        self.attached: list[tuple[str, str]] = []  # (worker, request id) per client attach
        for n, w in self.workers.items():
            ds = w.svc.direct
            attach = ds._attach

            def spy_attach(conn, a, _attach=attach, _n=n):
                self.attached.append((_n, a.request_id))
                return _attach(conn, a)

            ds._attach = spy_attach
        cfg = RouterConfig(
            model_path=str(path),
            model_id=IN_PROC_MODEL_ID,
            policy=PolicyKind.COLOCATED,
            direct_streams=True,
            # progress often: the router learns of the tokens (and the test of the decoding) soon
            direct=DirectConfig(progress_interval_s=0.02),
        )
        self.svc = GenerateServicer(self.registry, cfg, RouterMetrics(self.metrics_registry))
        assert self.svc.migrator is not None and self.svc.direct is not None
        self.resumes: list[tuple[str, int]] = []  # (request id, tokens the client had) per ResumeDirect
        book = self.svc.direct
        resume = book.ResumeDirect

        async def spy(req, ctx):
            self.resumes.append((req.request_id, len(req.token_ids)))
            return await resume(req, ctx)

        book.ResumeDirect = spy  # type: ignore[method-assign]
        self.serve(
            [
                (client_pb2.DESCRIPTOR.services_by_name["Generate"], self.svc),
                (direct_pb2.DESCRIPTOR.services_by_name["DirectResume"], self.svc.direct),
            ]
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm_path):
    with _Cluster.on_tiny_llama(tmp_path_factory.mktemp("dmig"), smollm_path) as cl:
        yield cl


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.address, timeout=CALL_S, direct=True) as c:
        yield c


def _prompt(i: int) -> list[int]:
    return random_prompt(2000, i)


def _direct_decoding(cluster: _Cluster, min_tokens: int) -> dict[str, str]:
    """Direct requests decoding now whose client was redirected to their worker and of which the
    router knows ``min_tokens`` output tokens or more: id -> decode worker."""
    out = {}
    for rid, d in cluster.svc.running().items():
        legs = d.legs
        if (
            d.state is State.DECODING
            and isinstance(legs, DirectLegs)
            and legs._direct
            and legs._redirect is not None
            and len(legs.run.out_ids) >= min_tokens
        ):
            out[rid] = d.m.decode_id
    return out


def _started_directly(cluster: _Cluster, fut: Future, min_tokens: int, deadline: float) -> tuple[str, str]:
    """Wait (until ``deadline``, monotonic) for the one request running, that of ``fut``, to decode
    directly with ``min_tokens`` output tokens known to the router: (request id, decode worker)."""
    while not (running := _direct_decoding(cluster, min_tokens)):
        assert not fut.done() and time.monotonic() < deadline, "the request never decoded directly"
        time.sleep(0.001)
    ((rid, src),) = running.items()
    return rid, src


def _migrate_mid_way(
    cluster: _Cluster, client: Client, prompt: list[int], params: SamplingParams, known: int = 4
):
    """Run ``prompt`` and migrate it to the other worker once the router knows ``known`` of its
    tokens: (result, request id, source, outcome)."""
    with ThreadPoolExecutor(1) as ex:
        with cluster.paced(PACE_S):  # still decoding when MigrateOut arrives
            fut = ex.submit(client.complete, prompt, params)
            rid, src = _started_directly(cluster, fut, known, time.monotonic() + CALL_S)
            outcome = cluster.migrate(rid, cluster.other(src))
        return fut.result(CALL_S), rid, src, outcome


@pytest.mark.parametrize(
    "params,known",
    [(GREEDY, 8), (SEEDED, 8), (GREEDY, 0)],
    ids=["greedy", "seeded", "greedy-right-after-redirect"],
)
def test_a_direct_stream_migrated_mid_way_equals_the_unmigrated_run(cluster, client, params, known) -> None:
    """``known``: output tokens the router knows (from progress) when the migration starts; 0:
    right after the redirect, the router knowing next to nothing of what the client took."""
    prompt = _prompt(1)
    ref = client.complete(prompt, params)
    assert len(ref.token_ids) == params.max_tokens
    moved_before = cluster.metric("pdserve_router_migrations_total", reason="manual", result="migrated")
    got, rid, src, outcome = _migrate_mid_way(cluster, client, prompt, params, known)
    assert outcome.migrated, outcome
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert got.finish.reason == ref.finish.reason
    assert len(got.token_ids) == params.max_tokens
    # the client took tokens from the source, then resumed through the router (ResumeDirect)
    (resumed,) = [r for r in cluster.resumes if r[0] == rid]
    assert max(known, 1) <= resumed[1] < params.max_tokens, resumed
    # then streamed straight from the destination: attached there, the router not relaying
    assert [w for w, r in cluster.attached if r == rid] == [src, cluster.other(src)]
    assert (
        cluster.metric("pdserve_router_migrations_total", reason="manual", result="migrated")
        == moved_before + 1
    )
    assert cluster.metric("pdserve_router_migration_blocks_copied_total") > 0
    cluster.wait_no_blocks()


def test_drain_empties_a_decode_worker_of_direct_streams_while_they_continue(cluster, client) -> None:
    n = 6
    params = SamplingParams(max_tokens=320, temperature=0.0, ignore_eos=True)
    prompts = [_prompt(100 + i) for i in range(n)]
    with ThreadPoolExecutor(n) as ex:
        refs = list(ex.map(lambda p: client.complete(p, params), prompts))
    cluster.wait_no_blocks()
    drained_before = cluster.metric("pdserve_router_migrations_total", reason="drain", result="migrated")
    with ThreadPoolExecutor(n) as ex:
        with cluster.paced(PACE_S):  # each stream counted on the victim is still there to migrate
            futs = [ex.submit(client.complete, p, params) for p in prompts]
            deadline = time.monotonic() + CALL_S
            while len(running := _direct_decoding(cluster, 4)) < n:
                assert time.monotonic() < deadline and not any(f.done() for f in futs), (
                    "streams did not start"
                )
                time.sleep(0.002)
            counts = {w: list(running.values()).count(w) for w in cluster.workers}
            victim = max(counts, key=lambda w: counts[w])
            report = cluster.on_loop(drain_decode_worker(cluster.svc, victim, timeout_s=60, poll_s=0.01))
            still_running = sum(not f.done() for f in futs)
            on_victim = [r for r, d in cluster.svc.running().items() if d.m.decode_id == victim]
        got = [f.result(CALL_S) for f in futs]
    assert report.drained and report.remaining == 0 and on_victim == [], report
    assert report.migrated == counts[victim] >= 1 and report.aborted == 0, report
    assert still_running >= 1  # the drain did not wait for them to finish
    assert cluster.used_blocks()[victim] == 0
    for r, g in zip(refs, got, strict=True):
        assert g.token_ids == r.token_ids and g.text == r.text
    assert (
        cluster.metric("pdserve_router_migrations_total", reason="drain", result="migrated")
        == drained_before + counts[victim]
    )
    moved = {r for r, w in running.items() if w == victim}
    assert moved <= {r for r, _ in cluster.resumes}  # each moved stream resumed through the router
    cluster.registry.get(victim).draining = False
    cluster.wait_no_blocks()


def test_a_destination_without_direct_streams_relays_the_rest(cluster, client) -> None:
    prompt = _prompt(3)
    ref = client.complete(prompt, GREEDY)
    dests = {n: w.svc for n, w in cluster.workers.items()}
    saved = {n: s.direct for n, s in dests.items()}
    # the destination's Decode / ResumeStream see no direct streams (its Attach still serves the
    # source's client): it refuses the grant, and the router relays from the client's index
    with ThreadPoolExecutor(1) as ex:
        try:
            with cluster.paced(PACE_S):  # still decoding when MigrateOut arrives
                fut = ex.submit(client.complete, prompt, GREEDY)
                rid, src = _started_directly(cluster, fut, 4, time.monotonic() + CALL_S)
                dests[cluster.other(src)].direct = None
                outcome = cluster.migrate(rid, cluster.other(src))
            got = fut.result(CALL_S)
        finally:
            for n, s in dests.items():
                s.direct = saved[n]
    assert outcome.migrated, outcome
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert [w for w, r in cluster.attached if r == rid] == [src]  # never attached to the destination
    cluster.wait_no_blocks()


def test_a_migrated_direct_stream_ends_on_a_stop_string_matched_on_the_destination(cluster, client) -> None:
    """The stop string is taken from the unmigrated run's text, after the migration point: the
    destination renders the text (continuing the client's) and ends the request on it."""
    prompt = _prompt(4)
    full = client.complete(prompt, GREEDY)
    text = full.text
    at = len(text) // 2  # well after the migration point (the router knows 4 tokens then)
    stop = next(
        (
            text[i : i + n]
            for i in range(at, len(text))
            for n in range(1, 13)
            if i + n <= len(text)
            and text[i : i + n].strip()
            and "\ufffd" not in text[i : i + n]
            and text.find(text[i : i + n]) == i
        ),
        None,
    )
    assert stop is not None, f"no stop string found in the reference text {text!r}"
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True, stop=(stop,))
    ref = client.complete(prompt, params)
    assert ref.finish.reason == "stop" and ref.finish.stop == stop and ref.text == text[: text.find(stop)]
    got, rid, src, outcome = _migrate_mid_way(cluster, client, prompt, params)
    assert outcome.migrated, outcome
    assert got.text == ref.text and got.token_ids == ref.token_ids
    assert got.finish.reason == ref.finish.reason and got.finish.stop == stop
    assert [w for w, r in cluster.attached if r == rid] == [src, cluster.other(src)]
    cluster.wait_no_blocks()


def test_a_direct_stream_migrated_twice_streams_from_each_destination(cluster, client) -> None:
    """Moved to the other worker, then back while it streams from there (its resumed stream
    ended at the switch like a Decode's): the client attaches to each in turn, output identical."""
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    prompt = _prompt(5)
    ref = client.complete(prompt, params)

    def direct_on(rid: str, worker: str, min_tokens: int) -> bool:
        d = cluster.svc.running().get(rid)
        legs = d.legs if d is not None else None
        return (
            d is not None
            and d.state is State.DECODING
            and legs._direct
            and legs._redirect is not None
            and legs._redirect.worker_id == worker
            and len(legs.run.out_ids) >= min_tokens
        )

    with ThreadPoolExecutor(1) as ex:
        with cluster.paced(PACE_S):  # still decoding when each MigrateOut arrives
            fut = ex.submit(client.complete, prompt, params)
            deadline = time.monotonic() + CALL_S
            rid, src = _started_directly(cluster, fut, 4, deadline)
            first = cluster.migrate(rid, cluster.other(src))
            known = len(cluster.svc.running()[rid].legs.run.out_ids)
            while not direct_on(rid, cluster.other(src), known + 4):
                assert not fut.done() and time.monotonic() < deadline, "never streamed from the destination"
                time.sleep(0.001)
            second = cluster.migrate(rid, src)
        got = fut.result(CALL_S)
    assert first.migrated and second.migrated, (first, second)
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert [w for w, r in cluster.attached if r == rid] == [src, cluster.other(src), src]
    assert len([r for r in cluster.resumes if r[0] == rid]) == 2
    cluster.wait_no_blocks()


def test_a_ticket_outlives_a_slow_admission(cluster, client, monkeypatch) -> None:
    """The router mints a request's ticket when it opens the Decode call; the decode worker checks
    it when the request is admitted (the slot registered) and again at the client's attach. Seen
    in a 1,000-request burst on SmolLM2 (``pdserve serve``, direct streams): 227 requests failed
    PERMISSION_DENIED "ticket refused: expired", their admission having waited for free blocks
    past the 30 s TTL. The ticket now lasts the TTL plus the first-message deadline the router
    gives the admission (``ProgressConfig.first_message_deadline_s``). Here the TTL is 0.5 s and
    every admission waits 1.5 s first."""
    book = cluster.svc.direct
    monkeypatch.setattr(book, "config", DirectConfig(ticket_ttl_s=0.5, progress_interval_s=0.02))
    minted: list[tuple[float, TicketClaims]] = []

    def mint(claims: TicketClaims, _mint=book.signer.mint) -> str:
        minted.append((time.time(), claims))
        return _mint(claims)

    monkeypatch.setattr(book.signer, "mint", mint)
    for w in cluster.workers.values():

        def slow(*args, _wait=w.svc._wait_for_blocks, **kwargs):
            time.sleep(1.5)  # as an admission waiting for free blocks under load
            return _wait(*args, **kwargs)

        monkeypatch.setattr(w.svc, "_wait_for_blocks", slow)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompt = _prompt(300)
    attached_before = len(cluster.attached)
    got = client.complete(prompt, params)
    monkeypatch.undo()
    ref = client.complete(prompt, params)
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert len(cluster.attached) > attached_before  # streamed directly, not relayed
    # the router's part on its own (the worker's attach window, counted from its admission,
    # would also serve this request): the ticket lasts the TTL beyond the admission's allowance
    allowance = cluster.svc.config.progress.first_message_deadline_s()
    assert allowance is not None and allowance > 1.5
    lasts = [c.expires_at - t for t, c in minted]
    # (a local prefill adds the per-token allowance of its queued prompt tokens)
    assert lasts and all(0.5 + allowance - 0.2 <= d <= 0.5 + allowance + 0.005 * 300 + 1 for d in lasts), (
        allowance,
        lasts,
    )
    cluster.wait_no_blocks()
