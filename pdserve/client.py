"""pdserve client SDK: sync :class:`Client` and asyncio :class:`AsyncClient`.

Both stream :class:`Chunk` objects (new token ids, text delta, logprobs; the last one carries
``finish`` with usage and timing), honour deadlines (``timeout`` seconds) and cancellation, and
raise the typed exceptions of :mod:`pdserve.errors` (InvalidRequestError, ResourceExhaustedError
with ``retry_after_s``, UnavailableError, DeadlineExceededError, ...).

    from pdserve.client import Client
    with Client("127.0.0.1:50051") as c:
        for chunk in c.generate("Hello", max_tokens=32):
            print(chunk.text, end="")

Several routers of one cluster: ``Client("10.0.0.1:50051,10.0.0.2:50051")`` (or a list); a
router that cannot be reached or goes away is replaced by the next one (see :class:`Client`).
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.sampling_params import SamplingParams
from pdserve.choices import ChoicesResume, group_completions, num_choices, refuse_several, requested_n
from pdserve.client_direct import DirectMux, SyncDirectMux, direct_messages, direct_messages_sync
from pdserve.errors import PdserveError, UnavailableError
from pdserve.proto_convert import finish_from_proto, sampling_to_proto
from pdserve.router_addresses import parse_router_addresses
from pdserve.security import sdk_channel
from pdserve.status import error_from_rpc_error, raise_from_rpc_error
from pdserve.v1 import client_pb2, client_pb2_grpc, common_pb2, direct_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class Finish:
    reason: str | None
    stop: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    ttft_s: float
    e2e_s: float
    token_times_s: list[float]
    phases: dict[str, float]  # queue, prefill, transfer (KV publish + pull), decode
    kv_pull_s: float = 0.0  # the decode-side part of phases["transfer"]


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at an output position. ``token``: the token's own text
    (U+FFFD where it holds part of a UTF-8 character); ``token_bytes``: its exact bytes."""

    token_id: int
    logprob: float
    token: str = ""
    token_bytes: bytes = b""


@dataclass(frozen=True)
class TokenLogprob:
    """Logprob of a sampled token (``token``/``token_bytes`` as in :class:`TopLogprob`) and the
    ``top`` alternatives asked for (most likely first; the sampled token is among them when it
    ranks there)."""

    token_id: int
    logprob: float
    token: str = ""
    token_bytes: bytes = b""
    top: tuple[TopLogprob, ...] = ()


@dataclass
class Chunk:
    """``logprobs``: parallel to ``token_ids`` when logprobs were requested, else empty.
    ``choice_index``: the choice the chunk belongs to (``n > 1``; 0 otherwise); with ``n > 1``
    each choice's last chunk has its ``finish``."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Finish | None = None
    choice_index: int = 0


class ServingStatus(enum.Enum):
    """A router's grpc.health.v1 answer for its Generate service (:meth:`Client.health`)."""

    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    UNKNOWN = "UNKNOWN"


GENERATE_SERVICE = client_pb2.DESCRIPTOR.services_by_name["Generate"].full_name


def _logprob(m: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        m.token_id,
        m.logprob,
        m.token,
        m.token_bytes,
        tuple(TopLogprob(t.token_id, t.logprob, t.token, t.token_bytes) for t in m.top_logprobs),
    )


def _serving(resp: health_pb2.HealthCheckResponse) -> ServingStatus:
    if resp.status == health_pb2.HealthCheckResponse.SERVING:
        return ServingStatus.SERVING
    if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
        return ServingStatus.NOT_SERVING
    return ServingStatus.UNKNOWN


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish: Finish


def _chunk(m: client_pb2.GenerateResponse) -> Chunk:
    fin = None
    if m.HasField("finish"):
        f, t = m.finish, m.finish.timing
        r = finish_from_proto(f.reason)
        fin = Finish(
            reason=r.value if r else None,
            stop=f.stop,
            prompt_tokens=f.usage.prompt_tokens,
            completion_tokens=f.usage.completion_tokens,
            cached_prompt_tokens=f.usage.cached_prompt_tokens,
            ttft_s=t.ttft_s,
            e2e_s=t.e2e_s,
            token_times_s=list(t.token_times_s),
            phases={
                "queue": t.queue_s,
                "prefill": t.prefill_s,
                "transfer": t.transfer_s,
                "decode": t.decode_s,
            },
            kv_pull_s=t.kv_pull_s,
        )
    return Chunk(
        m.request_id, list(m.token_ids), m.text, [_logprob(lp) for lp in m.logprobs], fin, m.choice_index
    )


def build_request(
    prompt: str | list[int] | list[dict[str, str]],
    params: SamplingParams | None = None,
    *,
    model: str = "",
    request_id: str = "",
    priority: int = 0,
    tenant: str = "",
    cache_salt: str = "",
    adapter: str = "",
    ttft_s: float = 0.0,
    tpot_s: float = 0.0,
    **sampling: Any,
) -> client_pb2.GenerateRequest:
    """``prompt``: text, token ids, or chat messages ``[{"role", "content"}]``. Sampling keywords
    (max_tokens=..., temperature=...) build a SamplingParams, validated here before any RPC.
    ``adapter``: a LoRA adapter the cluster serves (workers' ``--lora NAME=PATH``; listed by
    ``list_adapters``); empty: the base model. Any other name is refused with NOT_FOUND."""
    params = params or SamplingParams(**sampling)
    req = client_pb2.GenerateRequest(
        model=model,
        sampling=sampling_to_proto(params),
        request_id=request_id,
        priority=priority,
        tenant=tenant,
        cache_salt=cache_salt,
        adapter=adapter,
        slo=common_pb2.SLO(ttft_s=ttft_s, tpot_s=tpot_s),
    )
    if isinstance(prompt, str):
        req.prompt = prompt
    elif prompt and isinstance(prompt[0], dict):
        req.chat.CopyFrom(client_pb2.ChatMessages(messages=[client_pb2.ChatMessage(**m) for m in prompt]))  # type: ignore[arg-type]
    else:
        req.prompt_token_ids.CopyFrom(client_pb2.TokenIds(ids=list(prompt)))  # type: ignore[arg-type]
    return req


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying ``api_key`` (``authorization: Bearer <key>``); empty for None."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _merge_md(
    base: tuple[tuple[str, str], ...], extra: Sequence[tuple[str, str]]
) -> tuple[tuple[str, str], ...]:
    """``base`` with the keys ``extra`` sets replaced by ``extra``'s values."""
    keys = {k for k, _ in extra}
    return tuple(kv for kv in base if kv[0] not in keys) + tuple(extra)


# ---------------------------------------------------------------- failover between routers (pure)


def replayable(req: client_pb2.GenerateRequest) -> bool:
    """Whether re-running ``req`` from the start yields the same tokens: greedy, or seeded (the
    token at each position depends only on (seed, position, logits))."""
    return req.sampling.temperature == 0.0 or req.sampling.HasField("seed")


def _is_failover(e: grpc.RpcError) -> bool:
    """A router that cannot be reached or went away (refused, reset, shut down): try the next."""
    return e.code() == grpc.StatusCode.UNAVAILABLE


class Resume:
    """What the caller has been given of one generation, across the streams that serve it.

    A stream cut off by a router that went away is re-issued on another router with the same
    request; for a :func:`replayable` request the new stream repeats the old one token for token
    and text character for text character, so :meth:`trim` drops the first ``delivered`` tokens
    and characters of the new stream and passes on the rest: the caller sees every token once,
    in order. The request id the caller saw first is kept on every later chunk."""

    def __init__(self) -> None:
        self.tokens = 0  # token ids given to the caller
        self.chars = 0  # text characters given to the caller
        self.finished = False
        self.request_id = ""
        self._seen_tokens = 0  # of the current stream
        self._seen_chars = 0

    @property
    def delivered(self) -> bool:
        return self.tokens > 0 or self.chars > 0

    def restart(self) -> None:
        """A new stream of the same request begins (from its first token)."""
        self._seen_tokens = self._seen_chars = 0

    def trim(self, c: Chunk) -> Chunk | None:
        """``c`` (the current stream's next chunk) less what the caller already has; None when
        nothing of it is new."""
        skip_t = max(0, min(len(c.token_ids), self.tokens - self._seen_tokens))
        skip_c = max(0, min(len(c.text), self.chars - self._seen_chars))
        self._seen_tokens += len(c.token_ids)
        self._seen_chars += len(c.text)
        c.request_id = self.request_id = self.request_id or c.request_id
        if skip_t or skip_c:
            c.token_ids = c.token_ids[skip_t:]
            c.logprobs = c.logprobs[skip_t:] if c.logprobs else c.logprobs
            c.text = c.text[skip_c:]
        if not c.token_ids and not c.text and c.finish is None and (skip_t or skip_c):
            return None
        self.tokens += len(c.token_ids)
        self.chars += len(c.text)
        self.finished = self.finished or c.finish is not None
        return c


class _Attempt(enum.Enum):
    """What to do after a stream failed."""

    RAISE = "raise"  # the error stands
    NEXT_ROUTER = "next_router"  # re-issue on the next router
    DONE = "done"  # the caller has the whole generation, finish included: the stream just ends


def after_failure(e: grpc.RpcError, resume: Resume, replay_ok: bool, routers_left: int) -> _Attempt:
    """Pure: whether a failed stream moves to the next router (see :class:`Client`). A router
    that went away after it delivered the finish (before the call's closing status) fails
    nothing: the generation is complete."""
    if resume.finished and _is_failover(e):
        return _Attempt.DONE
    if not _is_failover(e) or routers_left <= 0 or resume.finished:
        return _Attempt.RAISE
    if resume.delivered and not replay_ok:
        return _Attempt.RAISE
    return _Attempt.NEXT_ROUTER


def _failover_error(
    e: grpc.RpcError, address: str, resume: Resume, replay_ok: bool, tried: list[tuple[str, str]]
) -> PdserveError:
    """The exception of a stream that cannot go on: the router's own error, or, for a router that
    went away or answered UNAVAILABLE, an UnavailableError naming it (and every router tried
    before), of the class that router's error had (a StoreUnavailableError stays one)."""
    err = error_from_rpc_error(e)
    if not _is_failover(e):
        return err
    why = f"router {address} unavailable: {err}"
    if resume.delivered and not replay_ok and not resume.finished:
        why += (
            f" (after {resume.tokens} token(s) were delivered; an unseeded sampled generation cannot "
            "be resumed on another router: set seed= or temperature=0 to make it resumable)"
        )
    if tried:
        why += "; before it: " + "; ".join(f"router {a} unavailable: {d}" for a, d in tried)
    return type(err)(why)  # the last router's class stands (e.g. StoreUnavailableError)


class _Routers:
    """The routers one client talks to, in its order, and the round-robin start of each request."""

    def __init__(self, addresses: tuple[str, ...]) -> None:
        self.addresses = addresses
        self._next = itertools.count()

    def order(self) -> list[int]:
        """Router indices to try for a new request: the next in turn first, then the rest."""
        n = len(self.addresses)
        start = next(self._next) % n
        return [(start + i) % n for i in range(n)]


def _connect(
    target: str | Sequence[str],
    *,
    aio: bool,
    tls: bool | None,
    ca: str | bytes | None,
    cert: str | bytes | None,
    key: str | bytes | None,
    server_name: str | None,
    api_key: str | None,
) -> tuple[_Routers, list[Any], tuple[tuple[str, str], ...]]:
    """What :class:`Client` and :class:`AsyncClient` are made of: the router list, one channel per
    router (TLS as :func:`pdserve.security.sdk_channel`) and the auth metadata of every call."""
    routers = _Routers(parse_router_addresses(target, what="router address"))
    channels = [
        sdk_channel(a, tls=tls, ca=ca, cert=cert, key=key, server_name=server_name, aio=aio)
        for a in routers.addresses
    ]
    return routers, channels, auth_metadata(api_key)


def _all_unavailable(what: str, tried: list[tuple[str, str]]) -> UnavailableError:
    return UnavailableError(f"{what}: no router reachable: " + "; ".join(f"{a}: {d}" for a, d in tried))


# ---------------------------------------------------------------- sync


class _DirectCall:
    """A sync Generate call sent with ``direct_stream``, as :class:`Stream` uses a call: iterating
    it gives the merged messages (:func:`pdserve.client_direct.direct_messages_sync`), ``cancel``
    cancels the router's call (the merge then ends with its CANCELLED error and lets go of the
    worker's stream)."""

    def __init__(self, call: Any, messages: Iterator[client_pb2.GenerateResponse]) -> None:
        self._call, self._messages = call, messages

    def __iter__(self) -> Iterator[client_pb2.GenerateResponse]:
        return self._messages

    def cancel(self) -> None:
        self._call.cancel()


class Stream:
    """Iterator over a generation; ``cancel()`` stops it server-side (blocks are freed).

    A router that goes away before or during the stream is replaced by the next one (see
    :class:`Client`); the iterator goes on where it was."""

    def __init__(
        self,
        start: Callable[[int], Any],
        routers: _Routers,
        replay_ok: bool,
    ) -> None:
        self._start = start
        self._routers = routers
        self._order = routers.order()
        self._replay_ok = replay_ok
        self._call: Any = None
        self._cancelled = False
        self.num_choices = 1  # SamplingParams.n of the request (set by the client)
        self.router = ""  # the address of the router serving (or that last served) the stream
        self._call = self._open(0)

    def _open(self, attempt: int) -> Any:
        idx = self._order[attempt]
        self.router = self._routers.addresses[idx]
        return self._start(idx)

    def __iter__(self) -> Iterator[Chunk]:
        resume: Any = Resume() if self.num_choices == 1 else ChoicesResume(self.num_choices)
        tried: list[tuple[str, str]] = []
        attempt = 0
        while True:
            try:
                for m in self._call:
                    if self._cancelled:  # nothing after cancel(), even what had already arrived
                        return
                    c = resume.trim(_chunk(m))
                    if c is not None:
                        yield c
                return
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED and self._cancelled:
                    return
                left = len(self._order) - attempt - 1
                then = after_failure(e, resume, self._replay_ok, left)
                if then is _Attempt.DONE:
                    return
                if then is _Attempt.RAISE:
                    raise _failover_error(e, self.router, resume, self._replay_ok, tried) from e
                tried.append((self.router, e.details() or str(e.code())))
                log.warning("router %s unavailable: request goes on at the next router", self.router)
            attempt += 1
            resume.restart()
            self._call = self._open(attempt)
            if self._cancelled:
                self._call.cancel()

    def cancel(self) -> None:
        """Stop the generation server-side; the iterator then ends, giving no further chunk
        (direct streams included, whose chunks may already have arrived)."""
        self._cancelled = True
        self._call.cancel()


class Client:
    """A client of one or more routers of a cluster.

    ``target``: ``"host:port"``, several as ``"h1:p1,h2:p2"``, or a sequence of them. Requests
    start at the routers in turn (round-robin). A request whose router cannot be reached or goes
    away (UNAVAILABLE: refused, reset, shutting down) is re-issued on the next router at once,
    each router tried once per request: before any token arrived always; after tokens arrived only
    when the request is :func:`replayable` (greedy or seeded), and then the tokens already given
    are skipped (the caller sees each token once, identical to an uninterrupted run). An unseeded
    sampled stream cut off after its first token fails with UnavailableError naming the router.
    A re-issued request carries the same ``request_id``; the timing in its ``finish`` is the last
    router's.

    ``tls``/``ca``/``cert``/``key``/``server_name``: TLS to the routers
    (:func:`pdserve.security.sdk_channel`: on when ``ca`` is given; plaintext only to a loopback
    address). ``api_key``: sent as ``authorization: Bearer <api_key>`` with every call (a router
    with API keys requires it; ``pdserve keys add`` makes one).

    ``direct`` (default on; the default of ``generate(direct=)``): offer every request a direct
    stream. A router with direct streams (its default) has the request's decode worker stream the
    tokens to this client (one connection per worker, same TLS settings as the router channels;
    :mod:`pdserve.client_direct`), the router out of the token path; a router without them, or a
    request it cannot stream directly (``n``/``best_of`` > 1), is relayed. The tokens, text,
    logprobs, finish, failover and errors are the same either way (where chunks split may differ;
    the last chunk carries the last tokens and the finish in both)."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = None,
        tls: bool | None = None,
        ca: str | bytes | None = None,
        cert: str | bytes | None = None,
        key: str | bytes | None = None,
        server_name: str | None = None,
        api_key: str | None = None,
        direct: bool = True,
    ) -> None:
        self._routers, self._channels, self._md = _connect(
            target, aio=False, tls=tls, ca=ca, cert=cert, key=key, server_name=server_name, api_key=api_key
        )
        self.addresses = self._routers.addresses
        self.address = self.addresses[0]
        self.timeout = timeout
        self.direct = direct
        self._stubs = [client_pb2_grpc.GenerateStub(ch) for ch in self._channels]
        self._health = [health_pb2_grpc.HealthStub(ch) for ch in self._channels]
        self._resume_stubs = [direct_pb2_grpc.DirectResumeStub(ch) for ch in self._channels]
        self._direct_mux = SyncDirectMux(
            lambda a: sdk_channel(a, tls=tls, ca=ca, cert=cert, key=key, server_name=server_name, aio=False)
        )

    def close(self) -> None:
        self._direct_mux.close()
        for ch in self._channels:
            ch.close()

    def health(self, service: str = GENERATE_SERVICE) -> ServingStatus:
        """The cluster's grpc.health.v1 status of ``service`` (default: Generate), asking each
        router in turn: SERVING as soon as one router is; else the last reachable router's answer
        (NOT_SERVING while it has no worker to place a request on). Raises UnavailableError,
        naming every router, when none can be reached."""
        tried: list[tuple[str, str]] = []
        answer: ServingStatus | None = None
        for address, h in zip(self.addresses, self._health, strict=True):
            try:
                s = _serving(h.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout))
            except grpc.RpcError as e:
                if not _is_failover(e):
                    raise_from_rpc_error(e)
                tried.append((address, e.details() or str(e.code())))
                continue
            if s is ServingStatus.SERVING:
                return s
            answer = s
        if answer is None:
            raise _all_unavailable("health", tried)
        return answer

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompt,
        params: SamplingParams | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        direct: bool | None = None,
        **kw,
    ) -> Stream:
        """``metadata``: extra gRPC metadata of this call (e.g. a forwarded ``authorization``,
        which then replaces the client's own ``api_key``). ``direct`` (default: the client's):
        offer a direct stream from the decode worker."""
        req = build_request(prompt, params, **kw)
        req.direct_stream = self.direct if direct is None else direct
        md = _merge_md(self._md, metadata)
        t = timeout if timeout is not None else self.timeout

        def start(i: int) -> Any:
            call = self._stubs[i].Generate(req, timeout=t, metadata=md)
            if not req.direct_stream:
                return call
            stub = self._resume_stubs[i]
            return _DirectCall(
                call,
                direct_messages_sync(
                    call, self._direct_mux, lambda r: stub.ResumeDirect(r, timeout=t, metadata=md)
                ),
            )

        s = Stream(start, self._routers, replayable(req))
        s.num_choices = num_choices(req.sampling.n)
        return s

    def complete_choices(self, prompt, params: SamplingParams | None = None, **kw) -> list[Completion]:
        """Run a generation with ``n`` choices (``n=``, ``best_of=``) to the end; its choices
        whole, by choice index (each with its own finish)."""
        return group_completions(self.generate(prompt, params, **kw), requested_n(params, kw))

    def complete(self, prompt, params: SamplingParams | None = None, **kw) -> Completion:
        """Run a generation to the end and return it whole (``n > 1``: :meth:`complete_choices`)."""
        refuse_several(requested_n(params, kw), "complete")
        ids: list[int] = []
        text: list[str] = []
        fin = None
        rid = ""
        for c in self.generate(prompt, params, **kw):
            rid = c.request_id
            ids += c.token_ids
            text.append(c.text)
            fin = c.finish or fin
        assert fin is not None, "stream ended without a finish message"
        return Completion(rid, ids, "".join(text), fin)

    def _unary(self, what: str, call: Callable[[Any], Any]) -> Any:
        """``call(stub)`` at the routers in turn until one answers (UNAVAILABLE: the next)."""
        tried: list[tuple[str, str]] = []
        for i in self._routers.order():
            try:
                return call(self._stubs[i])
            except grpc.RpcError as e:
                if not _is_failover(e):
                    raise_from_rpc_error(e)
                tried.append((self.addresses[i], e.details() or str(e.code())))
        raise _all_unavailable(what, tried)

    def tokenize(self, text: str, model: str = "") -> list[int]:
        """``text``'s token ids under ``model``'s tokenizer (empty: the router's only model; a
        router serving several base models needs the name)."""
        r = self._unary(
            "tokenize",
            lambda s: s.Tokenize(
                client_pb2.TokenizeRequest(prompt=text, model=model), timeout=self.timeout, metadata=self._md
            ),
        )
        return list(r.token_ids)

    def list_models(self) -> list[str]:
        r = self._unary(
            "list_models",
            lambda s: s.ListModels(client_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._md),
        )
        return [m.id for m in r.models]

    def list_adapters(self) -> dict[str, list[str]]:
        """The LoRA adapters the cluster serves, by base model id (``generate(adapter=NAME)``)."""
        r = self._unary(
            "list_models",
            lambda s: s.ListModels(client_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._md),
        )
        return {m.id: list(m.adapters) for m in r.models}


# ---------------------------------------------------------------- asyncio


class AsyncClient:
    """:class:`Client` for asyncio: the same ``target`` (one router address, a comma-separated
    list, or a sequence), failover rules, TLS keywords and ``api_key``."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = None,
        tls: bool | None = None,
        ca: str | bytes | None = None,
        cert: str | bytes | None = None,
        key: str | bytes | None = None,
        server_name: str | None = None,
        api_key: str | None = None,
        direct: bool = True,
    ) -> None:
        """``direct``: as :class:`Client`'s (default on: direct streams where the router offers
        them, relayed otherwise)."""
        self._routers, self._channels, self._md = _connect(
            target, aio=True, tls=tls, ca=ca, cert=cert, key=key, server_name=server_name, api_key=api_key
        )
        self.addresses = self._routers.addresses
        self.address = self.addresses[0]
        self.timeout = timeout
        self.direct = direct
        self._stubs = [client_pb2_grpc.GenerateStub(ch) for ch in self._channels]
        self._health = [health_pb2_grpc.HealthStub(ch) for ch in self._channels]
        self._resume_stubs = [direct_pb2_grpc.DirectResumeStub(ch) for ch in self._channels]
        self._direct_mux = DirectMux(
            lambda a: sdk_channel(a, tls=tls, ca=ca, cert=cert, key=key, server_name=server_name, aio=True)
        )

    async def close(self) -> None:
        await self._direct_mux.close()
        for ch in self._channels:
            await ch.close()

    async def health(self, service: str = GENERATE_SERVICE) -> ServingStatus:
        """As :meth:`Client.health`."""
        tried: list[tuple[str, str]] = []
        answer: ServingStatus | None = None
        for address, h in zip(self.addresses, self._health, strict=True):
            try:
                s = _serving(
                    await h.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
                )
            except grpc.RpcError as e:
                if not _is_failover(e):
                    raise_from_rpc_error(e)
                tried.append((address, e.details() or str(e.code())))
                continue
            if s is ServingStatus.SERVING:
                return s
            answer = s
        if answer is None:
            raise _all_unavailable("health", tried)
        return answer

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generate(
        self,
        prompt,
        params: SamplingParams | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        direct: bool | None = None,
        **kw,
    ) -> AsyncIterator[Chunk]:
        """As :meth:`Client.generate` (failover included); closing the iterator cancels the call.
        ``direct`` (default: the client's): offer a direct stream from the decode worker."""
        req = build_request(prompt, params, **kw)
        req.direct_stream = self.direct if direct is None else direct
        md = _merge_md(self._md, metadata)
        t = timeout if timeout is not None else self.timeout
        replay_ok = replayable(req)
        order = self._routers.order()
        n = num_choices(req.sampling.n)
        resume: Any = Resume() if n == 1 else ChoicesResume(n)
        tried: list[tuple[str, str]] = []
        for attempt, i in enumerate(order):
            resume.restart()
            call = self._stubs[i].Generate(req, timeout=t, metadata=md)
            source = call
            if req.direct_stream:
                stub = self._resume_stubs[i]
                source = direct_messages(
                    call, self._direct_mux, lambda r, s=stub: s.ResumeDirect(r, timeout=t, metadata=md)
                )
            try:
                async for m in source:
                    c = resume.trim(_chunk(m))
                    if c is not None:
                        yield c
                return
            except grpc.RpcError as e:
                left = len(order) - attempt - 1
                then = after_failure(e, resume, replay_ok, left)
                if then is _Attempt.DONE:
                    return
                if then is _Attempt.RAISE:
                    raise _failover_error(e, self.addresses[i], resume, replay_ok, tried) from e
                tried.append((self.addresses[i], e.details() or str(e.code())))
                log.warning("router %s unavailable: request goes on at the next router", self.addresses[i])
            finally:
                call.cancel()
                if source is not call:  # the direct stream's connections let go of the request now
                    await source.aclose()

    async def complete_choices(self, prompt, params: SamplingParams | None = None, **kw) -> list[Completion]:
        """As :meth:`Client.complete_choices`."""
        n = requested_n(params, kw)
        return group_completions([c async for c in self.generate(prompt, params, **kw)], n)

    async def complete(self, prompt, params: SamplingParams | None = None, **kw) -> Completion:
        refuse_several(requested_n(params, kw), "complete")
        ids: list[int] = []
        text: list[str] = []
        fin = None
        rid = ""
        async for c in self.generate(prompt, params, **kw):
            rid = c.request_id
            ids += c.token_ids
            text.append(c.text)
            fin = c.finish or fin
        assert fin is not None
        return Completion(rid, ids, "".join(text), fin)

    async def _unary(self, what: str, call: Callable[[Any], Any]) -> Any:
        tried: list[tuple[str, str]] = []
        for i in self._routers.order():
            try:
                return await call(self._stubs[i])
            except grpc.RpcError as e:
                if not _is_failover(e):
                    raise_from_rpc_error(e)
                tried.append((self.addresses[i], e.details() or str(e.code())))
        raise _all_unavailable(what, tried)

    async def tokenize(self, text: str, model: str = "") -> list[int]:
        """As :meth:`Client.tokenize`."""
        r = await self._unary(
            "tokenize",
            lambda s: s.Tokenize(
                client_pb2.TokenizeRequest(prompt=text, model=model), timeout=self.timeout, metadata=self._md
            ),
        )
        return list(r.token_ids)

    async def list_models(self) -> list[str]:
        """As :meth:`Client.list_models`."""
        r = await self._unary(
            "list_models",
            lambda s: s.ListModels(client_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._md),
        )
        return [m.id for m in r.models]

    async def list_adapters(self) -> dict[str, list[str]]:
        """As :meth:`Client.list_adapters`."""
        r = await self._unary(
            "list_models",
            lambda s: s.ListModels(client_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._md),
        )
        return {m.id: list(m.adapters) for m in r.models}
