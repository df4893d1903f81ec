"""Live-migration downtime vs context length, and migration vs re-prefill (issue #14, Llumnix).

Two decode workers (the real gRPC services: ``decode_worker.service.AsyncDecodeServicer`` with
its migration RPCs) run in this process on 127.0.0.1 with a *tiny* random-weight Llama (2 layers,
hidden 128, 4 heads / 2 KV heads, fp32, vocab 1024, 8448 positions: tiny so that an 8k-token
context fits and prefills in seconds on a CPU; 1 KiB of KV per token). For each context length
(256 ... 8192 prompt tokens) a request is started on worker A (``Decode`` with local prefill),
and after ``--after`` streamed tokens the router side (``router.migration_client.migrate``) moves
it to worker B, then opens B's stream at the number of tokens it received
(``open_resumed_stream``). Measured as the client sees it:

* downtime = arrival of the last token streamed by A -> arrival of the first token that B
  generated (output index = the resume index);
* re-prefill (at ``--ratio-context``): what a migration avoids, B recomputing the request instead:
  a ``Decode`` with local prefill of prompt + generated tokens and ``max_tokens=1`` on B, from the
  call to its token (prefix caching off on both workers, so nothing is reused).

Also printed: TPOT (the median gap between the source's tokens before the migration: one decode
step as the client sees it), the source's own stop-and-copy time (request paused on its engine
thread -> destination running), the total migration time, stages and blocks copied. Each context
runs ``--repeats`` times, the contexts interleaved (host noise hits them alike); medians are used. Every migrated stream is checked token for token against an unmigrated greedy run.
Targets: downtime(8k) / downtime(256) <= 1.5 and downtime / re-prefill at 4k <= 0.1.

Usage: nice -n 10 python bench/migration_downtime.py [--repeats 3] [--contexts 256,512,...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# both workers serve plaintext on 127.0.0.1 only (pdserve never falls back to plaintext by itself)
os.environ.setdefault("PDSERVE_TLS", "off")

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.proto_convert import sampling_to_proto  # noqa: E402
from pdserve.v1 import worker_pb2, worker_pb2_grpc  # noqa: E402
from pdserve.worker_base import Role, WorkerConfig, WorkerState  # noqa: E402
from router.migration_client import MigrationResult, migrate, open_resumed_stream  # noqa: E402

VOCAB = 1024
MAX_POS = 8192 + 256
FLAT_TARGET = 1.5  # downtime(largest) / downtime(smallest)
REPREFILL_TARGET = 0.1  # downtime / re-prefill at --ratio-context


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--contexts",
        default="256,512,1024,2048,4096,8192",
        help="prompt lengths (tokens) (default %(default)s)",
    )
    p.add_argument("--repeats", type=int, default=3, help="migrations per context (default 3); medians")
    p.add_argument(
        "--after",
        type=int,
        default=4,
        help="tokens streamed from the source before migrating (default %(default)s)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=48, help="tokens each request generates (default %(default)s)"
    )
    p.add_argument(
        "--ratio-context",
        type=int,
        default=4096,
        help="context of the re-prefill comparison (default %(default)s)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    return p


def make_model(root: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    d = root / "tiny-llama-8k"
    model.save_pretrained(d, safe_serialization=True)
    return d


class Worker:
    def __init__(self, path: Path, name: str) -> None:
        from prometheus_client import CollectorRegistry

        from decode_worker.service import AsyncDecodeServicer
        from pdserve.metrics import KVPullMetrics
        from pdserve.worker_main import serve_worker

        eng = LLMEngine.from_pretrained(
            path,
            EngineConfig(
                num_kv_blocks=1200,
                block_size=16,
                enable_prefix_caching=False,
                max_num_batched_tokens=2048,
                max_model_len=MAX_POS,
            ),
        )
        cfg = WorkerConfig(worker_id=name, role=Role.DECODE, model_path=str(path), store_address="")
        self.state = WorkerState(cfg, eng)
        self.svc = AsyncDecodeServicer(
            self.state, None, KVPullMetrics(CollectorRegistry(), name), stream_window_s=0.0
        )
        self.server, port = serve_worker(
            [(worker_pb2.DESCRIPTOR.services_by_name["Worker"], self.svc)], Role.DECODE, "127.0.0.1", 0, name
        )
        self.address = self.state.address = f"127.0.0.1:{port}"

    def used_blocks(self) -> int:
        return self.state.loop.call(lambda e: e.kv.num_used_blocks)

    def stop(self) -> None:
        self.server.stop(0).wait()
        self.svc.close()
        self.state.close()


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def _req(rid: str, prompt: list[int], max_tokens: int) -> worker_pb2.DecodeRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return worker_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling_to_proto(params), local_prefill=True
    )


@dataclass
class Run:
    downtime_s: float  # client view: last source token -> first destination token
    tpot_s: float  # client view: median gap between the source's tokens before the migration
    source_downtime_s: float  # the source's stop-and-copy: paused -> destination running
    total_s: float
    stages: int
    blocks: int
    tokens: list[int]


async def reference(w: Worker, prompt: list[int], max_tokens: int, rid: str) -> list[int]:
    async with grpc.aio.insecure_channel(w.address) as ch:
        out: list[int] = []
        async for m in worker_pb2_grpc.WorkerStub(ch).Decode(_req(rid, prompt, max_tokens)):
            out.extend(m.token_ids)
        return out


async def migrate_once(a: Worker, b: Worker, prompt: list[int], args: argparse.Namespace, rid: str) -> Run:
    async with grpc.aio.insecure_channel(a.address) as ach, grpc.aio.insecure_channel(b.address) as bch:
        astub, bstub = worker_pb2_grpc.WorkerStub(ach), worker_pb2_grpc.WorkerStub(bch)
        seen: list[int] = []
        arrivals: list[float] = []
        task = None
        try:
            async for m in astub.Decode(_req(rid, prompt, args.max_tokens)):
                if m.token_ids:
                    arrivals.append(time.perf_counter())
                seen.extend(m.token_ids)
                if task is None and len(seen) >= args.after:
                    task = asyncio.create_task(migrate(astub, rid, b.address, max_stages=4))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.ABORTED:
                raise
        if task is None:
            raise RuntimeError("the request finished before it could be migrated: raise --max-tokens")
        rep = await task
        if rep.result is not MigrationResult.MIGRATED:
            raise RuntimeError(f"migration of {rid} failed: {rep.result.name} {rep.message}")
        first_dst = None
        async for m in open_resumed_stream(bstub, rid, len(seen)):
            if first_dst is None and len(seen) + len(m.token_ids) > rep.resume_token_index:
                first_dst = time.perf_counter()
            seen.extend(m.token_ids)
        assert first_dst is not None
        gaps = [y - x for x, y in zip(arrivals[1:], arrivals[2:], strict=False)]  # after the first decode
        tpot = statistics.median(gaps) if gaps else float("nan")
        return Run(
            first_dst - arrivals[-1],
            tpot,
            rep.downtime_s,
            rep.total_s,
            rep.num_stages,
            rep.blocks_copied,
            seen,
        )


async def reprefill_once(b: Worker, tokens: list[int], rid: str) -> float:
    async with grpc.aio.insecure_channel(b.address) as ch:
        t0 = time.perf_counter()
        async for _m in worker_pb2_grpc.WorkerStub(ch).Decode(_req(rid, tokens, 1)):
            pass
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    contexts = [int(x) for x in args.contexts.split(",")]
    if args.ratio_context not in contexts:
        contexts.append(args.ratio_context)
    with tempfile.TemporaryDirectory() as td:
        path = make_model(Path(td))
        a, b = Worker(path, "bench-src"), Worker(path, "bench-dst")
        try:
            return asyncio.run(_bench(a, b, contexts, args))
        finally:
            a.stop()
            b.stop()


async def _bench(a: Worker, b: Worker, contexts: list[int], args: argparse.Namespace) -> int:
    await migrate_once(a, b, _prompt(64, 0), args, "warm-up")  # first-call allocations, not timed
    rows: dict[int, list[Run]] = {n: [] for n in contexts}
    exact = True
    reprefill: list[float] = []
    refs = {n: await reference(a, _prompt(n, n), args.max_tokens, f"ref-{n}") for n in contexts}
    for i in range(args.repeats):  # contexts interleaved: host noise hits every context alike
        for n in contexts:
            prompt, ref = _prompt(n, n), refs[n]
            r = await migrate_once(a, b, prompt, args, f"m-{n}-{i}")
            exact &= r.tokens == ref
            rows[n].append(r)
            if n == args.ratio_context:
                # what the migration avoids: B recomputing the prompt and the tokens so far
                at = ref[: args.after + 1]
                reprefill.append(await reprefill_once(b, prompt + at, f"rp-{n}-{i}"))
    leaked = a.used_blocks() + b.used_blocks()
    med = {n: statistics.median(r.downtime_s for r in rs) for n, rs in rows.items()}
    print(
        f"tiny random Llama (2 layers, hidden 128, 2 KV heads, fp32, 1 KiB KV/token), block 16, CPU, "
        f"{args.repeats} migrations per context, {torch.get_num_threads()} torch threads; direct gRPC on 127.0.0.1"
    )
    print(
        f"{'context':>8} {'downtime ms (median)':>21} {'runs ms':>28} {'TPOT ms':>8} {'src stop-copy ms':>17} "
        f"{'total ms':>9} {'stages':>6} {'blocks':>6}"
    )
    for n in contexts:
        rs = rows[n]
        print(
            f"{n:>8} {med[n] * 1e3:>21.2f} {str([round(r.downtime_s * 1e3, 1) for r in rs]):>28} "
            f"{statistics.median(r.tpot_s for r in rs) * 1e3:>8.2f} "
            f"{statistics.median(r.source_downtime_s for r in rs) * 1e3:>17.2f} "
            f"{statistics.median(r.total_s for r in rs) * 1e3:>9.1f} "
            f"{statistics.median(r.stages for r in rs):>6} {statistics.median(r.blocks for r in rs):>6}"
        )
    lo, hi = min(contexts), max(contexts)
    flat = med[hi] / med[lo]
    rp = statistics.median(reprefill)
    ratio = med[args.ratio_context] / rp
    total_ratio = statistics.median(r.total_s for r in rows[args.ratio_context]) / rp
    print(
        f"re-prefill at {args.ratio_context} (+{args.after + 1} generated) tokens: median {rp * 1e3:.1f} ms "
        f"runs {[round(x * 1e3, 1) for x in reprefill]}"
    )
    print(f"migrated streams identical to unmigrated runs: {exact}; blocks held after the runs: {leaked}")
    src_med = {n: statistics.median(r.source_downtime_s for r in rs) for n, rs in rows.items()}
    print(
        f"source-side stop-and-copy (paused -> destination running) {hi}/{lo} = {src_med[hi] / src_med[lo]:.3f} "
        "(for information; the target is on the client-view downtime)"
    )
    ok_flat = flat <= FLAT_TARGET
    ok_rp = ratio <= REPREFILL_TARGET
    print(
        f"downtime({hi})/downtime({lo}) = {flat:.3f} (target <= {FLAT_TARGET}): {'PASS' if ok_flat else 'FAIL'}"
    )
    print(
        f"downtime/re-prefill at {args.ratio_context} = {ratio:.3f} (target <= {REPREFILL_TARGET}): "
        f"{'PASS' if ok_rp else 'FAIL'}; whole migration (all stages)/re-prefill = {total_ratio:.3f}"
    )
    return 0 if (ok_flat and ok_rp and exact and leaked == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
