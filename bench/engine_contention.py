"""What the decode worker's engine loses to the work beside it: same process (GIL) or not (#12).

A launched decode worker steps its engine on one thread while its event loop, in the same
process, renders each request's text and builds the messages its clients get. On the serving-
efficiency bench (``bench/serving_efficiency.py``) the worker's engine thread spends as much CPU
per token as the embedded engine but is *blocked* (waiting for the GIL) for about as long as its
event loop runs Python. This bench isolates that cost, with no gRPC and no other process of the
cluster, on the engine the workers run (tiny Llama, same KV pool and batch limit):

* ``alone``: the engine stepped here, rendering its own text (the embedded baseline of
  ``serving_efficiency``);
* ``thread``: the engine hands each step's token ids to a consumer thread in this process that
  does the event loop's per-token work (renders every request's text with its own incremental
  detokenizer, as the worker's loop does after ``LLMEngine.take_detokenizer``, and builds and
  serializes one ``GenerateResponse`` per request every ``--tokens-per-message`` tokens and at
  its end) — the decode worker's layout today;
* ``process``: the same consumer in a child process, fed through a pipe (the engine side pays
  the pickling) — the layout of an engine in a process of its own (vLLM v1's engine core).

Every repeat checks that each mode rendered the same text for every request (the consumer's
work is real). Printed per mode: tokens/s, its ratio to ``alone`` (median over ``--repeats`` alternated runs),
the engine thread's CPU per token and the consumer's CPU per token. The ratio ``process /
thread`` is what moving the engine out of the gRPC process would gain on this host, before any
gRPC cost; it is a measurement of the design choice, not a target.

Run: ``python bench/engine_contention.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import queue
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cluster_load import (  # noqa: E402
    Progress,
    add_closed_loop_args,
    closed_loop_blocks,
    make_engine,
    parse_modes,
    prompt_ids,
    require_positive,
    tiny_model,
    torch_threads,
)

MODES = ("alone", "thread", "process")
END = b""  # the pipe's end-of-run marker
CHILD_TIMEOUT_S = 120.0  # the consumer process's start, and its catching up after the last step


# ------------------------------------------------------------------------------- the consumer
class _Output:
    """What :meth:`engine.detokenizer.OutputText.render` reads of a ``RequestOutput`` and sets."""

    __slots__ = ("new_token_ids", "finished", "stop_reason", "text_delta", "text")

    def __init__(self, new_token_ids: list[int], finished: bool, stop_reason: int | None) -> None:
        self.new_token_ids, self.finished, self.stop_reason = new_token_ids, finished, stop_reason


class Consumer:
    """The event loop's per-token work for every request: text rendered from the token ids (an
    ``engine.detokenizer.OutputText`` per request, as the worker's loop renders) and a
    serialized ``GenerateResponse`` per ``per_message`` tokens and at the request's end."""

    def __init__(self, tokenizer, per_message: int) -> None:
        from engine.detokenizer import IncrementalDetokenizer, OutputText
        from pdserve.v1 import client_pb2

        self._new_text = lambda: OutputText(IncrementalDetokenizer(tokenizer))
        self._response = client_pb2.GenerateResponse
        self.per_message = per_message
        self.renderers: dict[int, OutputText] = {}
        self.pending: dict[int, tuple[list[int], list[str]]] = {}
        self.texts: dict[int, str] = {}  # each finished request's whole text (checked against the engine's)

    def feed(self, step: list[tuple[int, list[int], bool, int | None]]) -> None:
        for rid, new, finished, stop in step:
            r = self.renderers.get(rid)
            if r is None:
                r = self.renderers[rid] = self._new_text()
            out = _Output(new, finished, stop)
            r.render(out)  # as the worker's event loop renders a RequestOutput
            ids, texts = self.pending.setdefault(rid, ([], []))
            ids.extend(new)
            texts.append(out.text_delta)
            if finished or len(ids) >= self.per_message:
                msg = self._response(request_id=str(rid), token_ids=ids, text="".join(texts))
                msg.SerializeToString()  # the bytes a stream would write
                del self.pending[rid]
            if finished:
                self.texts[rid] = self.renderers.pop(rid).detok.text


def _consumer_thread(q: queue.SimpleQueue, c: Consumer, cpu: list[float]) -> None:
    t0 = time.thread_time()
    while (step := q.get()) is not None:
        c.feed(step)
    cpu.append(time.thread_time() - t0)


def _consumer_process(conn, model: str, per_message: int) -> None:  # a child process
    from engine.tokenizer import Tokenizer

    c = Consumer(Tokenizer(model), per_message)
    conn.send_bytes(b"ready")
    t0 = time.process_time()
    while (raw := conn.recv_bytes()) != END:
        c.feed(pickle.loads(raw))
    conn.send((time.process_time() - t0, c.texts))


# ------------------------------------------------------------------------------- one run
@dataclass
class Run:
    mode: str
    tokens: int
    wall_s: float
    engine_cpu_s: float
    consumer_cpu_s: float
    texts: dict[int, str]  # request index -> its whole text (the engine's, or the consumer's)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s


def run_once(
    eng, model: str, mode: str, concurrency: int, total: int, max_tokens: int, a, offset: int
) -> Run:
    """``total`` requests of ``max_tokens`` tokens, ``concurrency`` in flight (closed loop),
    stepped on this thread; each step's outputs handed to the mode's consumer."""
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    take = mode != "alone"
    send = None
    consumer_cpu: list[float] = []
    texts: dict[int, str] = {}
    if mode == "thread":
        q: queue.SimpleQueue = queue.SimpleQueue()
        local = Consumer(eng.tokenizer, a.tokens_per_message)
        th = threading.Thread(target=_consumer_thread, args=(q, local, consumer_cpu))
        th.start()
        send = q.put
    elif mode == "process":
        parent, child = mp.Pipe()
        proc = mp.get_context("spawn").Process(
            target=_consumer_process, args=(child, model, a.tokens_per_message)
        )
        proc.start()
        if not parent.poll(CHILD_TIMEOUT_S) or parent.recv_bytes() != b"ready":
            proc.kill()
            raise RuntimeError(f"the consumer process did not start within {CHILD_TIMEOUT_S} s")

        def send(step, _c=parent) -> None:
            _c.send_bytes(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL))

    ids: dict[str, int] = {}

    def add(i: int) -> None:
        rid = f"c{offset + i}"
        eng.add_request(rid, prompt_ids(offset + i, a.prompt_len), params)
        ids[rid] = i
        if take:
            eng.take_detokenizer(rid)  # the consumer renders the text, as the worker's loop does

    progress = Progress(f"{mode}, {concurrency} streams", total)
    submitted = tokens = 0
    t0 = time.monotonic()
    e0 = time.thread_time()
    while submitted < min(concurrency, total):
        add(submitted)
        submitted += 1
    while eng.has_unfinished():
        outs = eng.step()
        step = []
        for o in outs:
            tokens += len(o.new_token_ids)
            if send is not None:
                step.append((ids[o.request_id], list(o.new_token_ids), o.finished, o.stop_reason))
            if o.finished:
                progress.add()
                if send is None:
                    texts[ids[o.request_id]] = o.text
                del ids[o.request_id]
                if submitted < total:
                    add(submitted)
                    submitted += 1
        if send is not None and step:
            send(step)
    engine_cpu = time.thread_time() - e0
    if mode == "thread":
        q.put(None)
        th.join()
        texts = local.texts
    elif mode == "process":
        parent.send_bytes(END)
        if not parent.poll(CHILD_TIMEOUT_S):
            proc.kill()
            raise RuntimeError(f"the consumer process did not finish within {CHILD_TIMEOUT_S} s")
        cpu_s, texts = parent.recv()
        consumer_cpu.append(cpu_s)
        proc.join()
    wall = time.monotonic() - t0
    return Run(mode, tokens, wall, engine_cpu, consumer_cpu[0] if consumer_cpu else 0.0, texts)


def check_same_text(runs: list[Run]) -> None:
    """Every mode of one repeat rendered the same text for every request (the consumer did the
    event loop's real work); RuntimeError naming the first request that differs otherwise."""
    first = runs[0]
    for r in runs[1:]:
        if r.texts.keys() != first.texts.keys():
            raise RuntimeError(f"{r.mode}: finished {len(r.texts)} requests, {first.mode} {len(first.texts)}")
        for i, t in first.texts.items():
            if r.texts[i] != t:
                raise RuntimeError(
                    f"request {i}: {r.mode} rendered {r.texts[i][:40]!r}, {first.mode} {t[:40]!r}"
                )


# ------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/engine_contention.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_closed_loop_args(p, requests_per_stream=2, prompt_len=8)
    p.add_argument(
        "--tokens-per-message", type=int, default=7, help="as the worker's 50 ms stream window gives"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="alternated runs of every mode; medians are printed"
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from " + ", ".join(MODES))
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    modes = parse_modes(a.modes, MODES)
    require_positive(
        a, ("streams", "requests_per_stream", "max_tokens", "prompt_len", "tokens_per_message", "repeats")
    )
    total = a.streams * a.requests_per_stream
    blocks = closed_loop_blocks(a.streams, a.prompt_len, a.max_tokens)
    runs: dict[str, list[Run]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp, torch_threads(1):
        model = str(tiny_model(Path(tmp)))
        eng = make_engine(model, blocks)
        try:
            run_once(eng, model, "alone", min(a.streams, 16), 16, 32, a, offset=10**6)  # warm-up
            for rep in range(a.repeats):
                for m in modes:
                    runs[m].append(
                        run_once(eng, model, m, a.streams, total, a.max_tokens, a, offset=rep * 10**5)
                    )
                check_same_text([runs[m][rep] for m in modes])
        finally:
            eng.close()
    load = os.getloadavg()
    print(
        f"tiny Llama, {a.streams} streams, {total} requests of {a.max_tokens} tokens, prompt {a.prompt_len}, "
        f"{a.tokens_per_message} tokens per message, 1 torch thread, cores {sorted(os.sched_getaffinity(0))}, "
        f"{a.repeats} alternated repeats (medians), load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    )
    base = statistics.median(r.tps for r in runs["alone"]) if "alone" in runs else None
    for m in modes:
        rs = runs[m]
        tps = statistics.median(r.tps for r in rs)
        tok = statistics.median(r.tokens for r in rs)
        eng_us = statistics.median(r.engine_cpu_s / r.tokens * 1e6 for r in rs)
        con_us = statistics.median(r.consumer_cpu_s / r.tokens * 1e6 for r in rs)
        ratio = f"{tps / base:.3f}" if base else "n/a"
        each = ", ".join(f"{r.tps:.0f}" for r in rs)
        print(
            f"  {m:8s} {tps:8.0f} tokens/s  (/ alone {ratio}; runs {each})  engine thread CPU "
            f"{eng_us:6.1f} us/token  consumer CPU {con_us:6.1f} us/token  ({tok} tokens)"
        )
    if "thread" in runs and "process" in runs:
        t = statistics.median(r.tps for r in runs["thread"])
        p = statistics.median(r.tps for r in runs["process"])
        print(
            f"  process / thread: {p / t:.3f}  (what the engine in its own process gains here, before gRPC)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
