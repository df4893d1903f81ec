"""Chunk-wise KV streaming from prefill to decode vs the whole-KV handoff (issue #14 part 2).

A prefill engine and a decode engine run in this process (each on its own engine thread, the real
``prefill_worker.kv_stream`` producer and ``decode_worker.stream_puller`` consumer), with an
KV store node in its own process (shared-memory arena; ``--store inline``: in this one) and a gRPC server on 127.0.0.1 serving the
prefill side's ``StreamKV``. Model: a random-weight Llama (default ``tiny``: 4 layers, hidden 256,
4 KV heads x 32, fp32: 4 KiB of KV per token, so that 8k-token prompts prefill in seconds on a
CPU) or ``--model PATH`` (e.g. SmolLM2-135M; 45 KiB/token). For each prompt length and transport:

* store, whole (today's handoff): prefill whole -> ``export_kv`` -> ``StorePublisher.publish``
  (one leased Put) -> ``StorePuller.pull`` (shared memory) -> ``import_kv``;
* store, streamed: each prefill chunk put under its own lease as its step ends, announced over
  the gRPC ``StreamKV`` stream, pulled by shared memory while the prefill goes on;
* grpc, whole: the whole KV sent in ``StreamKV`` messages once the prefill is done;
* grpc, streamed: each chunk's bytes sent as its step ends.

Measured (monotonic clock, one process): ``left`` = prompt done on the prefill engine -> KV
assembled and verified on the decode side (the handoff left after the prompt's last chunk);
``handoff`` = prompt done -> first decode token (``left`` + import + one decode step);
``e2e`` = request start -> first decode token. Ratios streamed / whole per length, medians of
``--repeats`` runs interleaved (host noise hits both alike). Every run's tokens are checked equal
across modes. Also printed: the prediction of ``router.policy.kv_stream.handoff_after_prefill``
(what the router and the simulator use) with a linear model fitted on this run's whole-KV runs,
and for Llama-2-7B on A100 (the simulator's Vidur profile, 25 GB/s link).
Target (issue #14): handoff left after the prompt at 2k tokens <= 0.3x the whole-KV handoff.

Usage: nice -n 10 python bench/layerwise_kv.py [--lengths 1024,2048,4096,8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PDSERVE_TLS", "off")

from decode_worker.puller import StorePuller  # noqa: E402
from decode_worker.stream_puller import StreamAssembler, StreamPuller, import_adder, open_stream  # noqa: E402
from engine.block_hash import chain_hashes  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.engine_loop import EngineLoop  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from kv_store.arena import host_id  # noqa: E402
from kv_store.client import KVStoreClient  # noqa: E402
from kv_store.service import serve  # noqa: E402
from kv_store.store import StoreConfig  # noqa: E402
from kv_store.transport import AutoTransport  # noqa: E402
from pdserve.limits import grpc_options  # noqa: E402
from pdserve.worker_base import engine_layout  # noqa: E402
from prefill_worker.kv_stream import (  # noqa: E402
    InlineChunkSink,
    KVStreamRegistry,
    StoreChunkSink,
    prefill_streamed,
    stream_kv_handler,
)
from prefill_worker.publisher import StorePublisher  # noqa: E402
from router.policy.kv_stream import handoff_after_prefill  # noqa: E402

VOCAB = 1024
MAX_POS = 8192 + 256
TARGET_LEN = 2048
TARGET = 0.3  # handoff left after the prompt, streamed / whole, at TARGET_LEN
PARAMS = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)  # prefill's token + one decode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="prompt lengths (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per length and mode (default %(default)s)")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk, tokens (default %(default)s)")
    p.add_argument(
        "--model", default="tiny", help="'tiny' (generated) or a model folder (default %(default)s)"
    )
    p.add_argument("--transports", default="store,grpc", help="store, grpc or both (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    p.add_argument(
        "--store",
        choices=["process", "inline"],
        default="process",
        help="the KV store node in its own process (as deployed) or in this one (default %(default)s)",
    )
    return p


def make_tiny(root: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for prm in model.parameters():
            if prm.dim() > 1:
                prm.normal_(0, 0.06)
    d = root / "tiny-llama-kvstream"
    model.save_pretrained(d, safe_serialization=True)
    return d


@dataclass(frozen=True)
class Run:
    left_s: float  # prompt done -> KV assembled on the decode side
    handoff_s: float  # prompt done -> first decode token
    e2e_s: float  # start -> first decode token
    prefill_s: float  # start -> prompt done
    tokens: tuple[int, ...]


class Bench:
    def __init__(self, path: Path, chunk: int, max_len: int, separate_store: bool) -> None:
        blocks = 2 * (-(-max_len // 16)) + 64
        cfg = EngineConfig(
            num_kv_blocks=blocks,
            block_size=16,
            enable_prefix_caching=False,
            max_num_batched_tokens=max(2048, chunk),
            long_prefill_token_threshold=chunk,
            max_model_len=min(MAX_POS, max_len + 64),
        )
        self.p = EngineLoop(LLMEngine.from_pretrained(path, cfg), name="bench-prefill")
        self.d = EngineLoop(LLMEngine.from_pretrained(path, cfg), name="bench-decode")
        self.layout = engine_layout(self.p.engine)
        self.model_id = self.p.engine.model_id
        self.node, self.proc = self._store(blocks + 64, separate_store)
        self.pub_client = KVStoreClient(self.node.address, timeout_s=60)
        self.publisher = StorePublisher(self.pub_client)
        self.puller = StorePuller(
            AutoTransport(host_id()), {self.node.address: KVStoreClient(self.node.address)}
        )
        self.reg = KVStreamRegistry(wait_s=60)
        self.server = grpc.server(ThreadPoolExecutor(4), options=grpc_options())
        self.server.add_generic_rpc_handlers((stream_kv_handler(self.reg),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options())
        self.pool = ThreadPoolExecutor(2)
        self.n = 0

    def _store(self, capacity: int, separate: bool) -> tuple[Any, subprocess.Popen | None]:
        """The store node: its own process (as deployed; default) or in this one."""
        lay = self.layout
        if not separate:
            node = serve(StoreConfig("bench-node", lay, capacity_blocks=capacity))
            return node, None
        cmd = [
            sys.executable,
            "-m",
            "kv_store",
            "--node-id",
            "bench-node",
            "--capacity-blocks",
            str(capacity),
        ]
        cmd += ["--model-id", lay.model_id, "--num-layers", str(lay.num_layers), "--num-kv-heads"]
        cmd += [str(lay.num_kv_heads), "--head-dim", str(lay.head_dim), "--dtype", lay.dtype]
        cmd += ["--block-size", str(lay.block_size), "--port", "0", "--host", "127.0.0.1"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            raise SystemExit(f"the store node did not start (exit {proc.returncode})")
        info = json.loads(line)

        class _Remote:
            address = info["address"]

        return _Remote(), proc

    def calibrate(self, n_tokens: int, repeats: int = 3) -> float:
        """Median seconds of a leased put + shm pull + release of ``n_tokens`` of KV (no prefill)."""
        from engine.llm_engine import KVExport
        from engine.model_runner import KVShape

        lay = self.layout
        n = -(-n_tokens // lay.block_size)
        shape = KVShape(
            lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.block_size, getattr(torch, lay.dtype)
        )
        ts = []
        for _ in range(repeats):
            self.n += 1
            toks = list(range(n * lay.block_size))
            hashes = chain_hashes(
                toks, lay.block_size, self.model_id, "", f"cal{self.n}", include_partial=True
            )
            kv = KVExport(
                f"cal{self.n}", self.model_id, toks, 0, hashes, torch.randn(n, *lay.block_shape), shape
            )
            t0 = time.monotonic()
            h = self.publisher.publish(kv, lay, 30.0)
            try:
                self.puller.pull(h)
            finally:
                self.puller.release(h)
            ts.append(time.monotonic() - t0)
        return med(ts)

    def close(self) -> None:
        self.ch.close()
        self.server.stop(0).wait()
        self.pool.shutdown()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        else:
            self.node.stop(0)
        self.p.stop()
        self.d.stop()

    def _first_decode_token(self, rid: str, adder) -> tuple[float, int]:
        q = self.d.add(rid, adder)
        while True:
            item = q.get(timeout=120)
            if isinstance(item, BaseException):
                raise item
            if item.new_token_ids:
                t = time.monotonic()
                tok = item.new_token_ids[0]
                while not item.finished:
                    item = q.get(timeout=120)
                return t, tok

    def run(self, prompt: list[int], transport: str, streamed: bool) -> Run:
        self.n += 1
        rid = f"b{self.n}"
        # a salt per run: every run's blocks have keys of their own (no write-once conflicts in the
        # store between runs of one prompt, no prefix reuse)
        adder = lambda e: e.add_request(rid, prompt, PARAMS, prefill_only=True, cache_salt=rid)  # noqa: E731
        t0 = time.monotonic()
        if transport == "store" and not streamed:  # today's handoff
            q = self.p.add(rid, adder)
            item = q.get(timeout=300)
            if isinstance(item, BaseException):
                raise item
            t_done = time.monotonic()
            kv = self.p.call(lambda e: e.export_kv(rid))
            self.p.call(lambda e: e.release(rid))
            h = self.publisher.publish(kv, self.layout, 30.0)
            try:
                blocks = self.puller.pull(h)
            finally:
                self.puller.release(h)
            t_asm = time.monotonic()
            first = kv.first_token
            dec_adder = lambda e: e.import_kv(rid, prompt, first, blocks, PARAMS, cache_salt=rid)  # noqa: E731
        else:
            if transport == "store":
                sink = StoreChunkSink(self.publisher, self.pub_client, self.layout, self.model_id, 30.0)
            else:
                sink = InlineChunkSink()
            call = open_stream(self.ch, rid, timeout_s=300)
            fut = self.pool.submit(
                prefill_streamed,
                self.p,
                self.reg,
                sink,
                self.layout,
                rid,
                prompt,
                adder,
                model_id=self.model_id,
                cache_salt=rid,
                streaming=streamed,
            )
            asm = StreamAssembler(
                rid,
                self.layout,
                chain_hashes(prompt, 16, self.model_id, "", rid, include_partial=True),
                len(prompt),
            )
            got = StreamPuller(self.puller).read(call, asm, call.cancel)
            t_asm = time.monotonic()
            res = fut.result(300)
            t_done = res.t_prefill_done
            first = got.final.first_token
            dec_adder = import_adder(rid, prompt, got, PARAMS, cache_salt=rid)
        t_first, second = self._first_decode_token(rid, dec_adder)
        return Run(t_asm - t_done, t_first - t_done, t_first - t0, t_done - t0, (first, second))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


class Fitted:
    """A linear model of this host fitted on the whole-KV runs (the router's estimator shape)."""

    def __init__(
        self, kv_bytes_per_token: int, prefill_s_per_token: float, bw: float, fixed_s: float
    ) -> None:
        self.kv_bytes_per_token = kv_bytes_per_token
        self.k, self.bw, self.fixed = prefill_s_per_token, bw, fixed_s

    def prefill_time(self, tokens, contexts=None) -> float:
        return self.k * sum(tokens)

    def transfer_time(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.fixed + nbytes / self.bw


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    transports = [t for t in args.transports.split(",") if t]
    for t in transports:
        if t not in ("store", "grpc"):
            raise SystemExit(f"unknown transport {t!r} (store, grpc)")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny(Path(tmp)) if args.model == "tiny" else Path(args.model)
        b = Bench(path, args.chunk, max(lengths), args.store == "process")
        try:
            kv_per_token = b.layout.block_nbytes // b.layout.block_size
            print(
                f"model {args.model} ({b.layout.num_layers} layers, {kv_per_token} B of KV per token), chunk "
                f"{args.chunk} tokens, torch threads {args.threads}, store node {args.store}, {args.repeats} repeats "
                "(medians)"
            )
            g = torch.Generator().manual_seed(1)
            prompts = {n: torch.randint(3, VOCAB - 1, (n,), generator=g).tolist() for n in lengths}
            b.run(prompts[lengths[0]][:256], "store", True)  # warm-up
            b.run(prompts[lengths[0]][:256], "store", False)
            runs: dict[tuple[int, str, bool], list[Run]] = {}
            for _ in range(args.repeats):
                for n in lengths:
                    for t in transports:
                        for s in (False, True):
                            runs.setdefault((n, t, s), []).append(b.run(prompts[n], t, s))
            ok = True
            for n in lengths:
                toks = {r.tokens for t in transports for s in (False, True) for r in runs[(n, t, s)]}
                if len(toks) != 1:
                    print(f"MISMATCH at {n} tokens: {toks}")
                    ok = False
            print(
                f"\n{'tokens':>6} {'transport':>9} | {'left whole':>10} {'streamed':>9} {'ratio':>6} | "
                f"{'handoff whole':>13} {'streamed':>9} {'ratio':>6} | {'e2e whole':>9} {'streamed':>9} {'ratio':>6}"
            )
            target_ratio = None
            for n in lengths:
                for t in transports:
                    w, s = runs[(n, t, False)], runs[(n, t, True)]
                    lw, ls = med([r.left_s for r in w]), med([r.left_s for r in s])
                    hw, hs = med([r.handoff_s for r in w]), med([r.handoff_s for r in s])
                    ew, es = med([r.e2e_s for r in w]), med([r.e2e_s for r in s])
                    print(
                        f"{n:>6} {t:>9} | {lw * 1e3:>8.1f}ms {ls * 1e3:>7.1f}ms {ls / lw:>6.2f} | "
                        f"{hw * 1e3:>11.1f}ms {hs * 1e3:>7.1f}ms {hs / hw:>6.2f} | "
                        f"{ew * 1e3:>7.0f}ms {es * 1e3:>7.0f}ms {es / ew:>6.2f}"
                    )
                    if n == TARGET_LEN and t == "store":
                        target_ratio = ls / lw
            # the router's / simulator's prediction, with a model fitted on this run's whole-KV store runs
            # the store transfer (leased put + shm pull + release) timed alone, engines idle
            small, big = min(args.chunk, min(lengths)), max(lengths)
            t_small, t_big = b.calibrate(small), b.calibrate(big)
            slope = max(1e-12, (t_big - t_small) / ((big - small) * kv_per_token))
            bw = 1.0 / slope
            fixed = max(0.0, t_small - small * kv_per_token * slope)
            k = med([r.prefill_s / n for n in lengths for r in runs[(n, transports[0], False)]])
            fit = Fitted(kv_per_token, k, bw, fixed)
            from simulator.latency import LatencySpec, make_latency_model

            a100 = make_latency_model(LatencySpec("llama-2-7b", "a100"))
            print(
                f"\nprediction (router.policy.kv_stream.handoff_after_prefill; fitted here: {k * 1e6:.0f} us/token "
                f"prefill (whole runs), store transfer timed alone: {bw / 1e9:.2f} GB/s + {fixed * 1e3:.1f} ms each)"
            )
            for n in lengths:
                e, ea = (
                    handoff_after_prefill(fit, n, 0, args.chunk),
                    handoff_after_prefill(a100, n, 0, args.chunk),
                )
                print(
                    f"{n:>6} tokens: fitted here {e.whole_s * 1e3:7.1f} -> {e.streamed_s * 1e3:6.1f} ms ({e.ratio:.2f}x); "
                    f"Llama-2-7B/A100 25 GB/s {ea.whole_s * 1e3:6.1f} -> {ea.streamed_s * 1e3:5.1f} ms ({ea.ratio:.2f}x)"
                )
            if target_ratio is not None:
                verdict = "PASS" if target_ratio <= TARGET else "FAIL"
                print(
                    f"\nhandoff left after the prompt at {TARGET_LEN} tokens (store), streamed / whole = "
                    f"{target_ratio:.2f} (target <= {TARGET}): {verdict}"
                )
            print("outputs identical across modes" if ok else "OUTPUTS DIFFER")
            return 0 if ok else 1
        finally:
            b.close()


if __name__ == "__main__":
    sys.exit(main())
