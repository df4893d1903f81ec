"""TTFT through the router with and without chunk-wise KV streaming (issue #14 part 2;
``python -m router --kv-stream``).

In this process: a KV store node, one prefill worker and one decode worker (the real gRPC
servicers on 127.0.0.1, each engine on its own thread) and three routers sharing the worker
registry: ``--kv-stream off`` (the whole-KV handoff after the prefill), ``store`` and ``grpc``.
A client sends the same greedy request (``--lengths`` prompt tokens, 4 output tokens) through
each router in turn, ``--repeats`` times interleaved (host noise hits all modes alike), and
measures from the call's start:

* ``ttft``: the first token (the prefill worker's, relayed by the router as soon as the Prefill
  answers: streaming does not change when it comes, only what is left after it);
* ``first decode``: the second token, the decode worker's first, which waits for the handoff:
  the whole KV's publish + pull + import after the prefill, or, streamed, the last chunk's;
* ``gap``: first decode - TTFT of the same run (the handoff left after the prompt plus one
  decode step, as the client sees it): the part streaming shortens, and the figure least
  disturbed by the host's noise (the prefill's own time varies by seconds on a loaded host).

Model: the random-weight tiny Llama of ``bench/layerwise_kv.py`` (4 layers, 4 KiB of KV per
token) with SmolLM2's tokenizer for the router. Outputs are checked equal across the modes.

Usage: nice -n 10 python bench/kv_stream_router.py [--lengths 2048,4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PDSERVE_TLS", "off")

from bench.layerwise_kv import VOCAB, make_tiny  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.client import Client  # noqa: E402
from router.lifecycle.stream_mode import KVStreamMode  # noqa: E402

MODES = (KVStreamMode.OFF, KVStreamMode.STORE, KVStreamMode.GRPC)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="2048,4096", help="prompt lengths (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per length and mode (default %(default)s)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk, tokens (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    return p


class Cluster:
    """Store node, prefill worker, decode worker and one router per mode, all in this process."""

    def __init__(self, path: Path, chunk: int, max_len: int) -> None:
        from prometheus_client import CollectorRegistry

        from decode_worker.puller import StorePuller
        from decode_worker.service import AsyncDecodeServicer
        from kv_store.arena import host_id
        from kv_store.client import KVStoreClient
        from kv_store.service import serve
        from kv_store.store import StoreConfig
        from kv_store.transport import AutoTransport
        from pdserve.grpc_server import start_aio_server
        from pdserve.metrics import KVPullMetrics, RouterMetrics
        from pdserve.v1 import client_pb2, worker_pb2
        from pdserve.worker_base import Role, WorkerConfig, WorkerState, engine_layout
        from pdserve.worker_main import serve_worker, worker_services
        from prefill_worker.aio_service import AsyncPrefillServicer
        from prefill_worker.publisher import StorePublisher
        from router.registry import Registry, WorkerKind, WorkerLoad
        from router.service import GenerateServicer, RouterConfig

        bs = 16
        blocks = 2 * (max_len // bs + 64)
        ecfg = EngineConfig(
            num_kv_blocks=blocks,
            block_size=bs,
            long_prefill_token_threshold=chunk,
            enable_prefix_caching=False,
        )
        pe, de = LLMEngine.from_pretrained(path, ecfg), LLMEngine.from_pretrained(path, ecfg)
        self.store_srv = serve(
            StoreConfig(node_id="kvs0", layout=engine_layout(pe), capacity_blocks=4 * blocks)
        )
        saddr = self.store_srv.address
        self.store = KVStoreClient(saddr)
        self.transport = AutoTransport(host_id())
        self.pst = WorkerState(WorkerConfig("prefill-0", Role.PREFILL, str(path), saddr, engine=ecfg), pe)
        self.psvc = AsyncPrefillServicer(
            self.pst, StorePublisher(self.store), self.store, self.transport, None
        )
        services, _ = worker_services(self.psvc, Role.PREFILL, None)
        self.pserver, pport = serve_worker(services, Role.PREFILL, "127.0.0.1", 0, "prefill-0")
        self.pst.address = f"127.0.0.1:{pport}"
        self.dst = WorkerState(WorkerConfig("decode-0", Role.DECODE, str(path), saddr, engine=ecfg), de)
        self.dsvc = AsyncDecodeServicer(
            self.dst,
            StorePuller(self.transport, {saddr: self.store}),
            KVPullMetrics(CollectorRegistry(), "decode-0"),
            stream_window_s=0.0,
        )
        desc = worker_pb2.DESCRIPTOR.services_by_name
        self.dserver, dport = serve_worker(
            [(desc["Worker"], self.dsvc)], Role.DECODE, "127.0.0.1", 0, "decode-0"
        )
        self.dst.address = f"127.0.0.1:{dport}"
        self.registry = Registry(heartbeat_timeout_s=1e9)
        load = WorkerLoad(0, 0, blocks, 0, block_size=bs)
        model_id = pe.model_id
        self.registry.register("prefill-0", WorkerKind.PREFILL, self.pst.address, model_id, load)
        self.registry.register("decode-0", WorkerKind.DECODE, self.dst.address, model_id, load)
        self.routers: dict[KVStreamMode, tuple[object, str]] = {}
        for mode in MODES:
            cfg = RouterConfig(
                model_path=str(path), model_id=model_id, kv_stream=mode, kv_stream_chunk_tokens=chunk
            )
            svc = GenerateServicer(self.registry, cfg, RouterMetrics(CollectorRegistry()))
            server, port, _ = start_aio_server(
                [(client_pb2.DESCRIPTOR.services_by_name["Generate"], svc)], "127.0.0.1", 0, name="router"
            )
            self.routers[mode] = (server, f"127.0.0.1:{port}")

    def run(self, mode: KVStreamMode, prompt: list[int]) -> tuple[float, float, tuple[int, ...]]:
        """(seconds to the first token, to the second token, the tokens)."""
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        toks: list[int] = []
        times: list[float] = []
        with Client(self.routers[mode][1], timeout=600) as c:
            t0 = time.monotonic()
            for r in c.generate(prompt, params):
                now = time.monotonic() - t0
                for t in r.token_ids:
                    toks.append(t)
                    times.append(now)
        return times[0], times[1], tuple(toks)

    def stop(self) -> None:
        for server, _ in self.routers.values():
            server.stop(0)  # type: ignore[attr-defined]
        self.pserver.stop(0).wait()
        self.dserver.stop(0).wait()
        self.dsvc.close()
        self.psvc.streams.stop()
        self.pst.close()
        self.dst.close()
        self.transport.close()
        self.store.close()
        self.store_srv.stop(0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    from pdserve.model_setup import ensure_default_model

    tok_from = ensure_default_model(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny(Path(tmp))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_from / f, path / f)
        cl = Cluster(path, args.chunk, max(lengths))
        try:
            g = torch.Generator().manual_seed(1)
            prompts = {n: torch.randint(3, VOCAB - 1, (n,), generator=g).tolist() for n in lengths}
            for m in MODES:  # warm-up
                cl.run(m, prompts[lengths[0]][:256])
            runs: dict[tuple[int, KVStreamMode], list[tuple[float, float, tuple[int, ...]]]] = {}
            for _ in range(args.repeats):
                for n in lengths:
                    for m in MODES:
                        runs.setdefault((n, m), []).append(cl.run(m, prompts[n]))
            print(
                f"tiny Llama (4 layers, 4 KiB KV/token), chunk {args.chunk}, torch threads {args.threads}, "
                f"{args.repeats} repeats interleaved (medians), through the router"
            )
            print("| prompt | mode | TTFT s | first decode token s | gap s | gap vs off |")
            print("|---|---|---|---|---|---|")
            ok = True
            for n in lengths:
                toks = {r[2] for m in MODES for r in runs[(n, m)]}
                if len(toks) != 1:
                    ok = False
                    print(f"MISMATCH at {n} tokens: {toks}")
                base = statistics.median(r[1] - r[0] for r in runs[(n, KVStreamMode.OFF)])
                for m in MODES:
                    ttft = statistics.median(r[0] for r in runs[(n, m)])
                    second = statistics.median(r[1] for r in runs[(n, m)])
                    gap = statistics.median(r[1] - r[0] for r in runs[(n, m)])
                    print(f"| {n} | {m.value} | {ttft:.3f} | {second:.3f} | {gap:.3f} | {gap / base:.2f}x |")
            print("outputs identical across modes" if ok else "OUTPUTS DIFFER")
            return 0 if ok else 1
        finally:
            cl.stop()


if __name__ == "__main__":
    sys.exit(main())
