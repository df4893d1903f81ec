"""Cluster set-ups that several integration modules share (one definition each, so that the
modules that test the same cluster differently cannot drift apart):

* :class:`InProcCluster`: in-process decode workers (:class:`tests.workers.InProcDecodeWorker`,
  re-exported here with its ``IN_PROC_BLOCKS`` / ``IN_PROC_BLOCK_SIZE``) registered with an
  in-process router servicer (the live-migration modules; colocated placement, no store);
* :func:`chaos_spec` / :func:`launched`: the chaos cluster (store, 2 routers, 2 prefill and 2
  decode workers, short progress deadlines) of test_chaos.py and test_direct_faults.py, stopped
  with every frozen process continued first;
* :func:`gloo_spec`, :func:`logged`, :func:`store_node_stats`: the gloo process-group cluster of
  the direct-handoff, gloo-migration and gloo KV-stream modules (1 prefill + 2 decode by
  default, always disaggregated); :func:`json_records` (under ``logged``): a launched process's
  JSON log records matching given fields (also test_tracing.py's records of one request id);
* :func:`paced_workers`: processes spawned inside it run every engine step for at least a given
  time (a tiny model otherwise finishes a request before a test can act on it mid-way);
  :func:`paced_loops` (and :meth:`InProcCluster.paced`): the same for in-process engine loops,
  only while a block runs (the race window of a test, e.g. until a migration has answered);
* :func:`tiny_model_paths`, :func:`check_routed_by_model`: two tiny base models served side by
  side (launched and on Ray), each model's requests equal to its engine run whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from prometheus_client import CollectorRegistry

from engine.config import EngineConfig
from engine.engine_loop import MIN_STEP_ENV
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import ClusterSpec, KVTransport, LocalCluster, launch
from router.registry import Registry, WorkerKind, WorkerLoad
from tests.workers import IN_PROC_BLOCK_SIZE, IN_PROC_BLOCKS, InProcDecodeWorker, worker_stats

# ------------------------------------------------------------------ in-process decode workers
IN_PROC_MODEL_ID = "llama"


class InProcCluster:
    """Decode workers ``names`` (:class:`InProcDecodeWorker`) registered, never expiring, with a
    fresh :class:`Registry` under model ``IN_PROC_MODEL_ID``. A subclass builds its router
    servicer on ``registry`` (metrics into ``metrics_registry``) and calls :meth:`serve`."""

    def __init__(self, path: str | Path, names: Sequence[str] = ("dec-a", "dec-b"), *, direct: bool = False):
        self.workers = {n: InProcDecodeWorker(path, n, direct=direct) for n in names}
        self.registry = Registry(heartbeat_timeout_s=1e9)  # no heartbeats here: never expire
        for n, w in self.workers.items():
            self.registry.register(
                n,
                WorkerKind.DECODE,
                w.address,
                IN_PROC_MODEL_ID,
                WorkerLoad(0, 0, IN_PROC_BLOCKS, 0, block_size=IN_PROC_BLOCK_SIZE),
            )
        self.metrics_registry = CollectorRegistry()

    @classmethod
    @contextlib.contextmanager
    def on_tiny_llama(cls, root: Path, tokenizer_from: Path) -> Iterator[Self]:
        """A cluster of this class on the tiny random Llama (made under ``root``, with
        ``tokenizer_from``'s tokenizer) while the block runs; stopped after it."""
        from tests.tiny_models import make_tiny_models

        cl = cls(make_tiny_models(root, tokenizer_from=tokenizer_from)["llama"])
        try:
            yield cl
        finally:
            cl.stop()

    def serve(self, services: list) -> None:
        """Start the router's aio server with ``services`` on a free loopback port (``address``)."""
        from pdserve.grpc_server import start_aio_server

        self.server, port, _ = start_aio_server(services, "127.0.0.1", 0, name="router")
        self.address = f"127.0.0.1:{port}"

    def other(self, worker: str) -> str:
        """The other worker of a two-worker cluster."""
        (out,) = set(self.workers) - {worker}
        return out

    def migrate(self, rid: str, dest: str, timeout_s: float = 120.0):
        """Migrate ``rid`` to ``dest`` through the router servicer ``svc`` (set by the subclass)
        on its loop; the migration's outcome."""

        async def go():
            return await self.svc.migrate(rid, dest)

        return self.on_loop(go(), timeout_s)

    def on_loop(self, coro, timeout_s: float = 120.0):
        """Run ``coro`` on the router's event loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.server.loop).result(timeout_s)

    def paced(self, min_step_s: float) -> paced_loops:
        """Every worker's engine steps last at least ``min_step_s`` while the block runs
        (:func:`paced_loops`)."""
        return paced_loops([w.state.loop for w in self.workers.values()], min_step_s)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics_registry.get_sample_value(name, labels) or 0.0

    def used_blocks(self) -> dict[str, int]:
        return {n: worker_stats(w.address).kv_blocks_used for n, w in self.workers.items()}

    def wait_no_blocks(self, timeout_s: float = 20.0) -> None:
        """Wait until no worker holds a block referenced by a request (AssertionError: leaked)."""
        deadline = time.monotonic() + timeout_s
        while any(self.used_blocks().values()):
            assert time.monotonic() < deadline, f"blocks leaked: {self.used_blocks()}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.stop(0)
        for w in self.workers.values():
            w.stop()


@contextlib.contextmanager
def paced_workers(min_step_s: float) -> Iterator[None]:
    """Inside: spawned processes inherit ``PDSERVE_TEST_MIN_STEP_S=min_step_s`` (the test pacing of
    :mod:`engine.engine_loop`: each engine step with work lasts at least that long). On the native
    kernels a tiny model decodes a short request in a few milliseconds; a test that must act while
    requests run (kill a router, migrate, count streamed chunks) paces the workers instead of
    racing them."""
    old = os.environ.get(MIN_STEP_ENV)
    os.environ[MIN_STEP_ENV] = str(min_step_s)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(MIN_STEP_ENV, None)
        else:
            os.environ[MIN_STEP_ENV] = old


class paced_loops:  # noqa: N801 - a context manager, named like one
    """Inside (``with``): each in-process :class:`engine.engine_loop.EngineLoop` of ``loops`` runs
    every step with work for at least ``min_step_s`` (its test pacing, read each step; commands
    still run while it waits); after the block, or :meth:`end` (idempotent) within it: their
    pacing as before. A test that must act on a request while it runs (migrate, drain) paces only
    that window, so the rest of the request, and the reference runs, decode at full speed."""

    def __init__(self, loops: Iterable[Any], min_step_s: float) -> None:
        if not min_step_s > 0:
            raise ValueError(f"min_step_s must be > 0, got {min_step_s!r}")
        self.loops, self.min_step_s = list(loops), min_step_s
        self._old: list[float] | None = None

    def __enter__(self) -> Self:
        self._old = [lp.min_step_s for lp in self.loops]
        for lp in self.loops:
            lp.min_step_s = self.min_step_s
        return self

    def end(self) -> None:
        """Restore the loops' pacing now (a no-op once done)."""
        if self._old is not None:
            for lp, was in zip(self.loops, self._old, strict=True):
                lp.min_step_s = was
            self._old = None

    def __exit__(self, *exc: object) -> None:
        self.end()


def random_prompt(seed: int, i: int) -> list[int]:
    """Prompt ``i`` of a family named by ``seed``: 20 to 59 token ids in [5, 300), reproducible."""
    rng = random.Random(seed + i)
    return [rng.randrange(5, 300) for _ in range(20 + (i * 7) % 40)]


# ------------------------------------------------------------------ the chaos cluster
CHAOS_LEASE_TTL_S = 10.0  # the store's lease cap: a killed holder's lease expires within the test
CHAOS_PREFILL, CHAOS_DECODE, CHAOS_ROUTERS = 2, 2, 2


def chaos_spec(
    model: str | Path, *, progress_timeout_s: float, direct_streams: bool | None = None
) -> ClusterSpec:
    """The chaos modules' cluster: store (leases capped at ``CHAOS_LEASE_TTL_S``), 2 routers, 2
    prefill and 2 decode workers; routers with a ``progress_timeout_s`` progress deadline, short
    first-message and prefill bounds and a fast quarantine probe (hung workers noticed in seconds).
    ``direct_streams`` None: ClusterSpec's default."""
    more = {} if direct_streams is None else {"direct_streams": direct_streams}
    return ClusterSpec(
        model_path=str(model),
        num_prefill=CHAOS_PREFILL,
        num_decode=CHAOS_DECODE,
        num_routers=CHAOS_ROUTERS,
        worker_kv_blocks=512,
        store_capacity_blocks=2048,
        store_args=(
            "--default-lease-ttl-s",
            str(CHAOS_LEASE_TTL_S),
            "--max-lease-ttl-s",
            str(CHAOS_LEASE_TTL_S),
        ),
        router_args=(
            "--progress-timeout-s",
            str(progress_timeout_s),
            "--first-message-timeout-s",
            "10",
            "--prefill-timeout-s",
            "5",
            "--quarantine-probe-interval-s",
            "0.2",
        ),
        **more,
    )


@contextlib.contextmanager
def launched(spec: ClusterSpec) -> Iterator[LocalCluster]:
    """The cluster of ``spec`` while the block runs; then stopped, every process a test froze
    (SIGSTOP) continued first so that it can take its SIGTERM."""
    cl = launch(spec)
    try:
        yield cl
    finally:
        for p in cl.procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
        cl.stop()


# ------------------------------------------------------------------ the gloo cluster
def gloo_spec(
    model: str | Path,
    *router_args: str,
    direct_streams: bool | None = None,
    num_decode: int = 2,
    kv_blocks: int = 512,
    worker_args: Sequence[str] = (),
) -> ClusterSpec:
    """Store, router, 1 prefill + ``num_decode`` decode workers in one gloo process group (KV
    handoff over it), every request disaggregated (``--policy least_loaded``: the default goodput
    policy may prefill a short prompt on a decode worker instead: no push to count);
    ``router_args`` added. ``kv_blocks``: each worker's KV pool and the store's capacity;
    ``worker_args``: extra worker flags. ``direct_streams`` None: ClusterSpec's default."""
    more = {} if direct_streams is None else {"direct_streams": direct_streams}
    return ClusterSpec(
        model_path=str(model),
        num_prefill=1,
        num_decode=num_decode,
        worker_kv_blocks=kv_blocks,
        store_capacity_blocks=kv_blocks,
        kv_transport=KVTransport.DIST,
        worker_args=tuple(worker_args),
        router_args=("--policy", "least_loaded", *router_args),
        **more,
    )


def json_records(cluster: LocalCluster, process: str, **fields: Any) -> list[dict[str, Any]]:
    """The JSON log records of ``process`` whose every key in ``fields`` has that value (lines
    that are not JSON objects skipped), in log order."""
    out = []
    for line in list(cluster.logs[process]):
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if all(rec.get(k) == v for k, v in fields.items()):
                out.append(rec)
    return out


def logged(cluster: LocalCluster, process: str, msg: str) -> list[dict[str, Any]]:
    """The JSON log records of ``process`` whose ``msg`` is ``msg`` (other lines skipped)."""
    return json_records(cluster, process, msg=msg)


def store_node_stats(cluster: LocalCluster):
    """The store node's stats (``kv_store`` NodeStats) now."""
    from kv_store.client import KVStoreClient

    store = KVStoreClient(cluster.store_address)
    try:
        return store.stats().node
    finally:
        store.close()


# ------------------------------------------------------------------ two base models
def tiny_model_paths(root: Path, tokenizer_from: Path) -> dict[str, Path]:
    """test_multi_model's tiny base models (model id -> HF folder under ``root``)."""
    from tests.integration.test_multi_model import MODELS, make_model

    return {m: make_model(root, m, over, tokenizer_from) for m, (over, _) in MODELS.items()}


def check_routed_by_model(
    client: Client,
    paths: Mapping[str, Path],
    prompts: Sequence[Sequence[int]],
    params: Iterable[SamplingParams],
    *,
    texts: bool = True,
) -> None:
    """Every model's requests (named by ``model``) equal its engine run whole, for each of
    ``params`` (tokens, and text when ``texts``); ListModels lists exactly the models; a request
    naming no model is refused (InvalidRequestError naming "several models")."""
    import pytest

    from pdserve.errors import InvalidRequestError

    params = list(params)
    assert sorted(client.list_models()) == sorted(paths)
    for m, p in paths.items():
        eng = LLMEngine.from_pretrained(p, EngineConfig(num_kv_blocks=128, block_size=16))
        for sp in params:
            refs = eng.generate([list(x) for x in prompts], sp)
            for prompt, ref in zip(prompts, refs, strict=True):
                got = client.complete(list(prompt), sp, model=m)
                assert got.token_ids == ref.token_ids, (m, sp.temperature)
                if texts:
                    assert got.text == ref.text
    with pytest.raises(InvalidRequestError, match="several models"):
        client.complete(list(prompts[0]), params[0])
