"""The cheap token path (#12): the decode worker's adaptive coalescing window and its text deltas
(DecodeResponse.text, rendered by the engine's detokenizer), and the router's catch-up of its own
detokenizer after a leg whose text came from a worker. Text is checked on the real SmolLM2
tokenizer, multi-byte characters split across tokens and stop strings included. In process: a
fake engine loop, no gRPC."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from engine.outputs import RequestOutput
from engine.request import FinishReason
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from pdserve.v1 import worker_pb2
from router.lifecycle.grpc_legs import RequestRun as _Run
from router.lifecycle.grpc_legs import caught_up_detok
from tests.unit.test_decode_aio import _Ctx, _req, _servicer

TEXTS = (
    "héllo wörld, naïve café: 世界你好 🎉🚀 ok",
    "Ünïcødé ∑∫√ → ← ✓ 日本語のテキスト 😀 end.",
    "plain ascii text with a STOP inside and more after it",
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from pdserve.model_setup import ensure_default_model

    return Tokenizer(ensure_default_model(progress=False))


def _out(rid: str, token: int, finished: bool = False, text: str = "") -> RequestOutput:
    return RequestOutput(
        rid, [token], [token], text, "", finished, FinishReason.LENGTH if finished else None, 0, 0
    )


async def _play(
    svc, loop, rid: str, steps: list[tuple[int, bool]], pause_s: float = 0.005
) -> list[list[int]]:
    """Play the engine: one output per step (token, finished), ``pause_s`` apart; the token lists
    of the messages the stream sent."""
    stream = svc.Decode(_req(rid), _Ctx())
    got: list[list[int]] = []

    async def consume() -> None:
        async for m in stream:
            got.append(list(m.token_ids))

    task = asyncio.ensure_future(consume())
    while rid not in loop.outs:
        await asyncio.sleep(0.001)
    for t, fin in steps:
        loop.outs[rid].put(_out(rid, t, finished=fin))
        await asyncio.sleep(pause_s)
    await asyncio.wait_for(task, 30)
    return got


def test_a_window_groups_tokens_that_come_faster_than_it() -> None:
    svc, loop, finished = _servicer(stream_window_s=5.0)  # far longer than the run
    steps = [(10 + i, i == 7) for i in range(8)]
    got = asyncio.run(_play(svc, loop, "w1", steps))
    svc.close()
    # the first at once (TTFT); the rest wait for the window, and the finish is not held
    assert got == [[10], [11, 12, 13, 14, 15, 16, 17]]
    assert finished == [1]


def test_held_tokens_go_when_the_window_closes_not_with_the_next_output() -> None:
    svc, loop, _ = _servicer(stream_window_s=0.05)

    async def run() -> list[list[int]]:
        stream = svc.Decode(_req("w2"), _Ctx())
        got: list[list[int]] = []

        async def consume() -> None:
            async for m in stream:
                got.append(list(m.token_ids))

        task = asyncio.ensure_future(consume())
        while "w2" not in loop.outs:
            await asyncio.sleep(0.001)
        q = loop.outs["w2"]

        async def sent(n: int) -> None:
            for _ in range(3000):
                if len(got) >= n:
                    return
                await asyncio.sleep(0.01)

        q.put(_out("w2", 1))
        await sent(1)
        q.put(_out("w2", 2))  # held by the window: no output follows until it has been sent
        await sent(2)
        sent_before_next = [list(x) for x in got]
        q.put(_out("w2", 3, finished=True))
        await asyncio.wait_for(task, 30)
        assert sent_before_next == [[1], [2]]
        return got

    got = asyncio.run(run())
    svc.close()
    assert got == [[1], [2], [3]]


def test_no_window_sends_each_ready_token_and_a_negative_one_is_refused() -> None:
    svc, loop, _ = _servicer(stream_window_s=0.0)
    got = asyncio.run(_play(svc, loop, "w3", [(5, False), (6, False), (7, True)], pause_s=0.02))
    svc.close()
    assert got == [[5], [6], [7]]
    with pytest.raises(ValueError, match="stream_window_s"):
        _servicer(stream_window_s=-1.0)


def test_messages_carry_the_engines_text_delta_when_it_has_a_tokenizer() -> None:
    svc, _, _ = _servicer()
    batch = [_out("t1", 5, text="he"), _out("t1", 6, text="llo"), _out("t1", 7, finished=True, text="!")]
    msg, failure = svc._message("t1", batch, False, None)
    assert failure is None and not msg.has_text and msg.text == ""  # the fake engine has none
    svc.state.engine.tokenizer = object()
    msg, _ = svc._message("t1", batch, False, None)
    assert msg.has_text and msg.text == "hello!" and list(msg.token_ids) == [5, 6, 7]
    svc.close()


# --------------------------------------------------------------------- text on the real tokenizer
def _router_deltas(tok: Tokenizer, ids: list[int], chunks: list[int], stop: tuple[str, ...]) -> list[str]:
    """What the router alone sends: its detokenizer fed the first token, then message by message."""
    d = IncrementalDetokenizer(tok, stop)
    out = [d.add(ids[:1])[0]]
    pos = 1
    for i, n in enumerate(chunks):
        final = i == len(chunks) - 1
        out.append(d.add(ids[pos : pos + n], final=final)[0])
        pos += n
    return out


def _mixed_deltas(
    tok: Tokenizer, ids: list[int], chunks: list[int], stop: tuple[str, ...], switch: int
) -> list[str]:
    """A worker renders the first ``switch`` messages (its engine's detokenizer, one token per
    step, seeded with the first token as ``import_kv`` does), then the router takes over with
    :func:`router.lifecycle.grpc_legs.caught_up_detok` (a resumed leg after a lost worker)."""
    params = SimpleNamespace(stop=stop)
    run = _Run("r", [1], params, 0.0, IncrementalDetokenizer(tok, stop))  # type: ignore[arg-type]
    first, _ = caught_up_detok(tok, run).add(ids[:1])
    run.out_ids.append(ids[0])
    run.detok_fed = 1
    run.sent_chars += len(first)
    out = [first]
    engine = IncrementalDetokenizer(tok, stop)
    engine.add(ids[:1])
    pos = 1
    for i, n in enumerate(chunks):
        final = i == len(chunks) - 1
        part = ids[pos : pos + n]
        if i < switch:
            text = "".join(engine.add([t], final=final and j == n - 1)[0] for j, t in enumerate(part))
            run.out_ids.extend(part)
        else:
            text, _ = caught_up_detok(tok, run).add(part, final=final)
            run.out_ids.extend(part)
            run.detok_fed = len(run.out_ids)
        run.sent_chars += len(text)
        out.append(text)
        pos += n
    return out


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stop", [(), ("STOP",), ("界你", "🚀")])
def test_worker_text_then_router_text_is_the_routers_text_exactly(tok: Tokenizer, text, stop) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert any(tok.token_bytes(t).decode("utf-8", errors="replace").count("\ufffd") for t in ids) or (
        text.isascii()
    ), "the sample must split a character across tokens"
    rest = len(ids) - 1
    chunks = [1] * rest
    three = [3] * (rest // 3) + ([rest % 3] if rest % 3 else [])
    for ch in (chunks, three):
        want = _router_deltas(tok, ids, ch, stop)
        for switch in (0, 1, len(ch) // 2, len(ch)):
            assert _mixed_deltas(tok, ids, ch, stop, switch) == want, (ch, switch)


# --------------------------------------------------------------------- the router's lazy deadline
def test_a_lazy_deadline_cancels_only_a_wait_past_its_bound() -> None:
    from router.deadline import LazyDeadline

    async def run() -> list[str]:
        dl = LazyDeadline()
        seen: list[str] = []
        for bound, sleep_s in ((5.0, 0.001), (5.0, 0.001), (0.02, 10.0), (5.0, 0.001)):
            dl.start(bound)  # the second and fourth waits reuse the first wait's timer
            exc: BaseException | None = None
            try:
                await asyncio.sleep(sleep_s)
            except BaseException as e:  # noqa: BLE001
                exc = e
            seen.append("expired" if dl.expired(exc) else ("ok" if exc is None else type(exc).__name__))
        dl.start(None)  # unbounded: never expires
        await asyncio.sleep(0.05)
        seen.append("expired" if dl.expired(None) else "ok")
        dl.close()
        return seen

    # the 0.02 s bound is shorter than the armed 5 s timer: a timer is armed for it
    assert asyncio.run(run()) == ["ok", "ok", "expired", "ok", "ok"]


def test_a_cancellation_from_elsewhere_is_not_taken_for_the_deadline() -> None:
    from router.deadline import LazyDeadline

    async def waiter(out: list[str]) -> None:
        dl = LazyDeadline()
        dl.start(30.0)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError as e:
            out.append("expired" if dl.expired(e) else "cancelled")
            raise
        finally:
            dl.close()

    async def run() -> list[str]:
        out: list[str] = []
        t = asyncio.ensure_future(waiter(out))
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        return out

    assert asyncio.run(run()) == ["cancelled"]


def test_a_spared_wait_goes_on_and_expires_once_not_spared() -> None:
    from router.deadline import LazyDeadline

    asks: list[int] = []

    def spare() -> bool:  # busy for the first two deadlines, then silent
        asks.append(1)
        return len(asks) <= 2

    async def run() -> str:
        dl = LazyDeadline(spare=spare)
        dl.start(0.02)
        exc: BaseException | None = None
        try:
            await asyncio.sleep(30)
        except BaseException as e:  # noqa: BLE001
            exc = e
        return "expired" if dl.expired(exc) else "ok"

    assert asyncio.run(run()) == "expired" and len(asks) == 3


def test_a_stream_at_a_worker_that_streams_others_is_not_stalled() -> None:
    from router.lifecycle.grpc_calls import Guarded as _Guarded

    class _Call:
        def __init__(self, first_after_s: float) -> None:
            self.first_after_s = first_after_s
            self.cancelled = False

        def __aiter__(self):
            return self._gen()

        async def _gen(self):
            await asyncio.sleep(self.first_after_s)
            yield worker_pb2.DecodeResponse(token_ids=[7])

        def cancel(self) -> bool:
            self.cancelled = True
            return True

    worker = SimpleNamespace(worker_id="decode-1")

    async def relay(streamed: dict[str, float], busy: bool) -> str:
        from router.progress import ProgressConfig, ProgressWatch

        watch = ProgressWatch(ProgressConfig(first_message_s=0.05))
        g = _Guarded(_Call(0.3), worker, watch=watch, streamed=streamed)  # type: ignore[arg-type]

        async def other_streams() -> None:  # the worker keeps streaming other requests
            while busy:
                streamed["decode-1"] = __import__("time").monotonic()
                await asyncio.sleep(0.01)

        side = asyncio.ensure_future(other_streams())
        try:
            got = [list(d.token_ids) async for d in g]
            return f"got {got}"
        except Exception as e:  # noqa: BLE001
            return type(e).__name__
        finally:
            busy = False
            side.cancel()

    assert asyncio.run(relay({}, busy=True)) == "got [[7]]"  # waited past its bound: spared
    assert asyncio.run(relay({}, busy=False)) == "WorkerLostError"  # silent everywhere: stalled
