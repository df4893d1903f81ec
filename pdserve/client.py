"""pdserve client SDK: sync :class:`Client` and asyncio :class:`AsyncClient`.

Both stream :class:`Chunk` objects (new token ids, text delta, logprobs; the last one carries
``finish`` with usage and timing), honour deadlines (``timeout`` seconds) and cancellation, and
raise the typed exceptions of :mod:`pdserve.errors` (InvalidRequestError, ResourceExhaustedError
with ``retry_after_s``, UnavailableError, DeadlineExceededError, ...).

    from pdserve.client import Client
    with Client("127.0.0.1:50051") as c:
        for chunk in c.generate("Hello", max_tokens=32):
            print(chunk.text, end="")
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.sampling_params import SamplingParams
from pdserve.proto_convert import finish_from_proto, sampling_to_proto
from pdserve.security import sdk_channel
from pdserve.status import raise_from_rpc_error
from pdserve.v1 import client_pb2, client_pb2_grpc, common_pb2


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
    """``logprobs``: parallel to ``token_ids`` when logprobs were requested, else empty."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Finish | None = None


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
    return Chunk(m.request_id, list(m.token_ids), m.text, [_logprob(lp) for lp in m.logprobs], fin)


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
    ``adapter``: a LoRA adapter id (empty: the base model; the router refuses any other with
    NOT_FOUND until adapters are served)."""
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


class Stream:
    """Iterator over a generation; ``cancel()`` stops it server-side (blocks are freed)."""

    def __init__(self, call) -> None:
        self._call = call

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for m in self._call:
                yield _chunk(m)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self._cancelled:
                return
            raise_from_rpc_error(e)

    _cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class Client:
    """``tls``/``ca``/``cert``/``key``/``server_name``: TLS to the router (:func:`pdserve.security.sdk_channel`:
    on when ``ca`` is given; plaintext only to a loopback address). ``api_key``: sent as
    ``authorization: Bearer <api_key>`` with every call (a router with API keys requires it;
    ``pdserve keys add`` makes one)."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        tls: bool | None = None,
        ca: str | bytes | None = None,
        cert: str | bytes | None = None,
        key: str | bytes | None = None,
        server_name: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._md = auth_metadata(api_key)
        self._channel = sdk_channel(address, tls=tls, ca=ca, cert=cert, key=key, server_name=server_name)
        self._stub = client_pb2_grpc.GenerateStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def health(self, service: str = GENERATE_SERVICE) -> ServingStatus:
        """The router's grpc.health.v1 status of ``service`` (default: Generate): NOT_SERVING
        while it has no worker to place a request on. Raises UnavailableError when the router
        cannot be reached."""
        try:
            return _serving(
                self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
            )
        except grpc.RpcError as e:
            raise_from_rpc_error(e)

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
        **kw,
    ) -> Stream:
        """``metadata``: extra gRPC metadata of this call (e.g. a forwarded ``authorization``,
        which then replaces the client's own ``api_key``)."""
        req = build_request(prompt, params, **kw)
        md = _merge_md(self._md, metadata)
        return Stream(
            self._stub.Generate(req, timeout=timeout if timeout is not None else self.timeout, metadata=md)
        )

    def complete(self, prompt, params: SamplingParams | None = None, **kw) -> Completion:
        """Run a generation to the end and return it whole."""
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

    def tokenize(self, text: str) -> list[int]:
        try:
            return list(
                self._stub.Tokenize(
                    client_pb2.TokenizeRequest(prompt=text), timeout=self.timeout, metadata=self._md
                ).token_ids
            )
        except grpc.RpcError as e:
            raise_from_rpc_error(e)

    def list_models(self) -> list[str]:
        try:
            return [
                m.id
                for m in self._stub.ListModels(
                    client_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._md
                ).models
            ]
        except grpc.RpcError as e:
            raise_from_rpc_error(e)


class AsyncClient:
    """TLS keywords and ``api_key`` as :class:`Client`."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        tls: bool | None = None,
        ca: str | bytes | None = None,
        cert: str | bytes | None = None,
        key: str | bytes | None = None,
        server_name: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._md = auth_metadata(api_key)
        self._channel = sdk_channel(
            address, tls=tls, ca=ca, cert=cert, key=key, server_name=server_name, aio=True
        )
        self._stub = client_pb2_grpc.GenerateStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def health(self, service: str = GENERATE_SERVICE) -> ServingStatus:
        """As :meth:`Client.health`."""
        try:
            return _serving(
                await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
            )
        except grpc.RpcError as e:
            raise_from_rpc_error(e)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generate(
        self, prompt, params: SamplingParams | None = None, *, timeout: float | None = None, **kw
    ) -> AsyncIterator[Chunk]:
        req = build_request(prompt, params, **kw)
        call = self._stub.Generate(
            req, timeout=timeout if timeout is not None else self.timeout, metadata=self._md
        )
        try:
            async for m in call:
                yield _chunk(m)
        except grpc.RpcError as e:
            raise_from_rpc_error(e)
        finally:
            call.cancel()

    async def complete(self, prompt, params: SamplingParams | None = None, **kw) -> Completion:
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
