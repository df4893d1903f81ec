"""OpenAI-compatible HTTP front end for a pdserve router (an ASGI app on uvicorn).

Run it with ``pdserve openai --router HOST:PORT --host 127.0.0.1 --port 8000 --tls off`` (plain
HTTP, loopback only, asked for) or with ``--tls-cert/--tls-key`` (HTTPS), or
``python -m pdserve.openai_api ...``; embed it with
``OpenAIServer(ServerConfig(router=..., tls="off")).start()`` (:mod:`pdserve.openai_api.server`).
Requests reach the router through the asyncio gRPC client SDK (:class:`pdserve.client.AsyncClient`);
one event loop thread serves every connection (no thread per connection or request).
``--router a:1,b:2`` names several routers: the SDK client starts requests round-robin and fails
over between them (:mod:`pdserve.client`).

Modules: :mod:`.translate` (pure: OpenAI JSON <-> SDK arguments and results, SSE framing),
:mod:`.errors` (pure: the one exception -> HTTP status / OpenAI error table), :mod:`.server`
(HTTP I/O), :mod:`.cli`.

Endpoints
---------
``GET /health``            200 ``{"status": "ok"}`` when the router's grpc.health.v1 status of its
                           Generate service is SERVING; 503 (OpenAI error body) while it is
                           NOT_SERVING (no prefill or no decode worker registered) or unreachable.
``GET /v1/models``         the router's models; ``GET /v1/models/{id}`` one of them (404 if unknown).
``POST /v1/completions``   ``prompt`` (string, token-id list, or a list holding one of those;
                           several prompts -> 400), ``max_tokens`` (default 16).
``POST /v1/chat/completions``  ``messages`` [{role: system|developer|user|assistant|tool,
                           content: string | [{"type": "text", "text"}]}] rendered by the router
                           with the model's chat template; ``max_tokens`` or its alias
                           ``max_completion_tokens`` (default ``Defaults.chat_max_tokens`` = 512);
                           ``logprobs`` (bool) + ``top_logprobs``.

Shared body fields: ``model`` (a base model the router serves or one of its LoRA adapters, run
on that adapter's base model; optional when the router serves one base model, required with
several; any other name -> 404 ``model_not_found``, never the base model's output; a name that
matches more than one -> 400), ``temperature`` (0 = greedy), ``top_p``, ``n`` (choices; parallel
sampling), ``stop`` (string or list), ``seed``, ``stream``, ``stream_options.include_usage``,
``user`` (-> the request's tenant). Completions ``logprobs`` is an integer (0..20) and
``best_of`` (>= ``n``) is accepted there only. Refused with 400 unless neutral: ``echo``,
``suffix``, ``logit_bias``, non-zero ``presence_penalty``/``frequency_penalty``,
``tools``/``functions``, non-text ``response_format``. A body field the endpoint does not read
(a typo such as ``max_token``) is 400 naming it, never ignored (:func:`.translate.parse_completion`,
:func:`.translate.parse_chat`).

pdserve extensions (request body): ``ttft_slo_s`` and ``tpot_slo_s`` (seconds; the request's SLO,
which a goodput-aware router may refuse early with 429 + Retry-After), ``priority`` (int, lower
= more important), and the engine's sampling knobs ``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``min_tokens``, ``stop_token_ids``.
pdserve extensions (response): a ``pdserve`` object — ``request_id`` (router's), ``ttft_s``,
``e2e_s``, ``phases`` {queue, prefill, transfer, decode}, ``kv_pull_s``, ``cached_prompt_tokens``,
``matched_stop`` — on a whole response and on the streamed chunk that carries ``finish_reason``;
``usage.prompt_tokens_details.cached_tokens``; an ``X-Request-Id`` header.
Logprobs carry each token's own text (``token``; U+FFFD where a token holds part of a UTF-8
character) and, in chat, its exact ``bytes``; ``top_logprobs`` lists the alternatives asked for
(chat: ``top_logprobs`` objects; completions: ``{text: logprob}`` per position). The stop token
that ended a request (EOS) is not listed, so the listed tokens spell the text;
``text_offset`` is where a token's text starts. Logprobs below -9999 are sent as -9999.
Prompt tokens + ``max_tokens`` beyond the model's context -> 400 naming the numbers (a chat
request without ``max_tokens`` asks for ``--chat-max-tokens``, default 512).

Streaming: ``data: {json}\\n\\n`` Server-Sent Events, then ``data: [DONE]``. Chat streams start with
a ``{"role": "assistant"}`` delta; every content chunk carries text (a token without text of its
own, such as EOS, makes no empty chunk); the last content chunk is followed by one with an empty
delta/text and ``finish_reason`` ("stop" | "length"); with ``include_usage`` a final chunk has
``choices: []`` and ``usage``. Errors before the first token are real HTTP statuses; later ones
are one ``data: {"error": ...}`` event before ``[DONE]``. A client disconnect cancels the
generation in the cluster.

Errors: ``{"error": {"message", "type", "param", "code"}}``; 400 invalid request / malformed
JSON or headers over ``--max-header-bytes``, 404 unknown model or URL, 405 wrong method, 411
chunked body, 413 body too large, 431 more than 100 header fields,
429 resource exhausted (``Retry-After``), 503 unavailable, 504 deadline exceeded, 500 otherwise
(:data:`pdserve.openai_api.errors.ERROR_TABLE`).
"""

from __future__ import annotations

__all__ = ["OpenAIServer", "ServerConfig"]


def __getattr__(name: str) -> object:
    # Lazy: importing the package (e.g. for the CLI's subcommand registration) pulls in no grpc.
    if name in __all__:
        from pdserve.openai_api import server

        return getattr(server, name)
    raise AttributeError(name)
