"""Verifying workers that register with the router, and proving later calls come from them.

Pure policy (no grpc; protobuf messages are read duck-typed) plus one seam, ``fetch_stats``, the
worker's own ``Stats`` RPC at the address it registered (the servicer passes a function that
calls it; tests pass a fake).

Registration (:meth:`WorkerVerifier.verify_registration`), before the worker gets any traffic:

1. the router calls the worker's ``Stats`` at the advertised address; no answer -> UNAVAILABLE
   ("could not reach your Worker service to verify it"), so a process that only speaks the
   Registry API (it saw prompts and injected text: issue #13) never gets in;
2. what ``Stats`` reports must be what the registration advertised: worker id, role, model and
   KV layout, and the capacity (``kv_blocks_total``, ``token_budget``); otherwise
   PERMISSION_DENIED naming the field (a worker cannot claim more capacity than it runs with);
3. the model id must be one the router serves and the KV geometry (layers, KV heads, head dim)
   that model's (a router may serve several base models: each worker is checked against its own), and
   dtype and block size those of the workers already registered for it (their blocks must be
   interchangeable): otherwise FAILED_PRECONDITION (:class:`LayoutMismatchError`);
4. capacity must be plausible: at most ``max_kv_blocks`` / ``max_token_budget`` when configured;
5. a worker id that is registered and alive at another address cannot be taken over (its
   worker token is required): ALREADY_EXISTS.

Identity afterwards (:class:`WorkerTokens`): a successful registration issues a random worker
token, returned in the Register call's trailing metadata :data:`WORKER_TOKEN_MD`; Heartbeat and
Deregister must present it (metadata of the same name), so only the worker itself can report
its load or remove itself; other callers get PERMISSION_DENIED and the worker is untouched.
A heartbeat may not change the verified capacity or layout either (PERMISSION_DENIED).

Transport identity (TLS, mutual TLS, the cluster token on the Registry service) is
:mod:`pdserve.security`'s and is checked before any of this runs.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pdserve.auth.worker_token import (  # noqa: F401 - the wire format, re-exported here
    WORKER_TOKEN_MD,
    worker_metadata,
    worker_token_from,
)
from pdserve.errors import (
    AlreadyExistsError,
    InvalidRequestError,
    LayoutMismatchError,
    PermissionDeniedError,
    UnavailableError,
)


@dataclass(frozen=True)
class LayoutView:
    """The fields of a ``pdserve.v1.KVLayout`` that must agree."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int

    @classmethod
    def of(cls, m: Any) -> LayoutView:
        return cls(m.model_id, m.num_layers, m.num_kv_heads, m.head_dim, m.dtype, m.block_size)


@dataclass(frozen=True)
class WorkerFacts:
    """What a worker says about itself: in its RegisterRequest or in its Stats answer."""

    worker_id: str
    role: int
    model: str
    kv_blocks_total: int
    token_budget: int
    layout: LayoutView
    # the pool's request bound (router.pool_fit refuses what no decode pool holds: a worker may
    # not claim a smaller one than it runs with, nor change it in a heartbeat)
    max_model_len: int = 0
    sliding_window: int = 0

    @classmethod
    def from_register(cls, req: Any) -> WorkerFacts:
        return cls.of(req.worker_id, req.role, req.model, req.stats)

    @classmethod
    def from_stats(cls, s: Any) -> WorkerFacts:
        return cls.of(s.worker_id, s.role, s.model, s)

    @classmethod
    def of(cls, worker_id: str, role: int, model: str, s: Any) -> WorkerFacts:
        return cls(
            worker_id,
            role,
            model,
            s.kv_blocks_total,
            s.token_budget,
            LayoutView.of(s.kv_layout),
            s.max_model_len,
            s.sliding_window,
        )

    def capacity(self) -> tuple:
        """What a heartbeat may not change: the capacity, the layout and the pool's request bound."""
        return (self.kv_blocks_total, self.token_budget, self.layout, self.max_model_len, self.sliding_window)


@dataclass(frozen=True)
class ExpectedModel:
    """What the router serves: its model id and KV geometry (from its ModelConfig), and optional
    plausibility bounds on a worker's capacity (None: no bound)."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_kv_blocks: int | None = None
    max_token_budget: int | None = None


def check_against_stats(adv: WorkerFacts, rep: WorkerFacts) -> None:
    """Step 2: every advertised fact equals the one the worker's Stats reports."""
    for name in (
        "worker_id",
        "role",
        "model",
        "kv_blocks_total",
        "token_budget",
        "layout",
        "max_model_len",
        "sliding_window",
    ):
        a, r = getattr(adv, name), getattr(rep, name)
        if a != r:
            raise PermissionDeniedError(
                f"registration refused: the registration says {name}={a!r} but the worker's own Stats "
                f"at its address reports {name}={r!r}; register with what the worker runs"
            )


def expected_for(adv: WorkerFacts, served: Sequence[ExpectedModel]) -> ExpectedModel:
    """The served model a registration names (a router serving several base models checks each
    worker against its own model's geometry); FAILED_PRECONDITION naming the served models when
    it names none of them."""
    for exp in served:
        if adv.model == exp.model_id:
            return exp
    names = ", ".join(repr(e.model_id) for e in served)
    raise LayoutMismatchError(
        f"registration refused: worker {adv.worker_id!r} serves model {adv.model!r} "
        f"(KV layout model {adv.layout.model_id!r}); this router serves {names}"
    )


def check_model(adv: WorkerFacts, exp: ExpectedModel, peers: Iterable[LayoutView]) -> None:
    """Steps 3 and 4: the router's model, interchangeable blocks, plausible capacity."""
    lay = adv.layout
    if adv.model != exp.model_id or lay.model_id != exp.model_id:
        raise LayoutMismatchError(
            f"registration refused: worker {adv.worker_id!r} serves model {adv.model!r} "
            f"(KV layout model {lay.model_id!r}); this router serves {exp.model_id!r}"
        )
    want = (exp.num_layers, exp.num_kv_heads, exp.head_dim)
    got = (lay.num_layers, lay.num_kv_heads, lay.head_dim)
    if got != want:
        raise LayoutMismatchError(
            f"registration refused: worker {adv.worker_id!r} has KV geometry (layers, kv heads, head dim) "
            f"{got}; the router's model has {want}"
        )
    if lay.block_size < 1 or not lay.dtype:
        raise LayoutMismatchError(f"registration refused: worker {adv.worker_id!r} reports no KV layout")
    for p in peers:
        if (p.dtype, p.block_size) != (lay.dtype, lay.block_size):
            raise LayoutMismatchError(
                f"registration refused: worker {adv.worker_id!r} has KV dtype {lay.dtype} and block size "
                f"{lay.block_size}, the registered workers {p.dtype} and {p.block_size}: their blocks "
                "would not be interchangeable; start it with the same settings"
            )
    if adv.kv_blocks_total < 1:
        raise InvalidRequestError(f"registration refused: worker {adv.worker_id!r} reports no KV blocks")
    if exp.max_kv_blocks is not None and adv.kv_blocks_total > exp.max_kv_blocks:
        raise PermissionDeniedError(
            f"registration refused: worker {adv.worker_id!r} claims {adv.kv_blocks_total} KV blocks; "
            f"this router accepts at most {exp.max_kv_blocks} per worker (max_kv_blocks)"
        )
    if exp.max_token_budget is not None and adv.token_budget > exp.max_token_budget:
        raise PermissionDeniedError(
            f"registration refused: worker {adv.worker_id!r} claims a token budget of {adv.token_budget}; "
            f"this router accepts at most {exp.max_token_budget} (max_token_budget)"
        )


def _describe(e: BaseException) -> str:
    details = getattr(e, "details", None)
    text = details() if callable(details) else None
    return f"{type(e).__name__}: {text or e}"


@dataclass(frozen=True)
class _Issued:
    token: str
    address: str
    facts: WorkerFacts


class WorkerTokens:
    """Worker id -> the token issued at its last successful registration (thread-safe)."""

    def __init__(self, make_token: Callable[[], str] = lambda: secrets.token_urlsafe(32)) -> None:
        self._make = make_token
        self._lock = threading.Lock()
        self._issued: dict[str, _Issued] = {}

    def issue(self, worker_id: str, address: str, facts: WorkerFacts) -> str:
        tok = self._make()
        with self._lock:
            self._issued[worker_id] = _Issued(tok, address, facts)
        return tok

    def holds(self, worker_id: str, token: str | None) -> bool:
        """Whether ``token`` is ``worker_id``'s current token (constant-time compare)."""
        with self._lock:
            cur = self._issued.get(worker_id)
        return cur is not None and token is not None and hmac.compare_digest(cur.token, token)

    def address(self, worker_id: str) -> str | None:
        with self._lock:
            cur = self._issued.get(worker_id)
        return cur.address if cur is not None else None

    def facts(self, worker_id: str) -> WorkerFacts | None:
        with self._lock:
            cur = self._issued.get(worker_id)
        return cur.facts if cur is not None else None

    def layouts(self, model: str, exclude: str, alive: Callable[[str], bool]) -> list[LayoutView]:
        """KV layouts of the verified workers of ``model`` that are alive, ``exclude`` left out."""
        with self._lock:
            items = list(self._issued.items())
        return [i.facts.layout for w, i in items if w != exclude and i.facts.model == model and alive(w)]

    def forget(self, worker_id: str) -> None:
        with self._lock:
            self._issued.pop(worker_id, None)


class WorkerVerifier:
    """Registration checks and worker identity for one router (see the module doc).

    ``fetch_stats(address)``: the worker's Stats at ``address`` (a ``WorkerStats``-like object);
    it raises on failure. ``alive(worker_id)``: whether that id is registered and alive now (the
    peers whose layout a newcomer must share are the verified workers alive now).
    ``expected``: the served model, or every model of a router serving several base models
    (:mod:`router.multi_model`): a registration is checked against the geometry of the model it
    names, and its dtype / block size against the live workers of that model only.
    """

    def __init__(
        self,
        expected: ExpectedModel | Sequence[ExpectedModel],
        fetch_stats: Callable[[str], Any],
        alive: Callable[[str], bool],
        tokens: WorkerTokens | None = None,
    ) -> None:
        served = (expected,) if isinstance(expected, ExpectedModel) else tuple(expected)
        if not served:
            raise ValueError("a worker verifier needs at least one served model")
        ids = [e.model_id for e in served]
        if len(set(ids)) != len(ids):
            raise ValueError(f"served model ids must be distinct, got {ids}")
        self.served = served  # every model the router serves (a worker must be one of them)
        self.expected = served[0]
        self._fetch = fetch_stats
        self._alive = alive
        self.tokens = tokens if tokens is not None else WorkerTokens()

    def verify_registration(self, req: Any, metadata: Iterable[Any] | None) -> str:
        """Verify a RegisterRequest (steps 1-5); returns the worker token to hand back."""
        adv = WorkerFacts.from_register(req)
        prev = self.tokens.address(adv.worker_id)
        if (
            prev is not None
            and prev != req.address
            and self._alive(adv.worker_id)
            and not self.tokens.holds(adv.worker_id, worker_token_from(metadata))
        ):
            raise AlreadyExistsError(
                f"worker id {adv.worker_id!r} is registered and alive at another address; choose another "
                "id, or deregister that worker first"
            )
        exp = expected_for(adv, self.served)
        check_model(adv, exp, self.tokens.layouts(adv.model, adv.worker_id, self._alive))
        try:
            stats = self._fetch(req.address)
        except Exception as e:  # noqa: BLE001 - any failure to verify refuses the registration
            raise UnavailableError(
                f"registration refused: the router could not reach the Worker service at {req.address} "
                f"to verify it ({_describe(e)}); serve "
                "the Worker API there before registering"
            ) from None
        check_against_stats(adv, WorkerFacts.from_stats(stats))
        return self.tokens.issue(adv.worker_id, req.address, adv)

    def check_identity(self, worker_id: str, metadata: Iterable[Any] | None, what: str) -> None:
        """PERMISSION_DENIED unless the caller holds ``worker_id``'s token."""
        if not self.tokens.holds(worker_id, worker_token_from(metadata)):
            raise PermissionDeniedError(
                f"{what} refused: only worker {worker_id!r} itself may do this (its worker token, "
                f"issued at registration, is missing or wrong)"
            )

    def check_heartbeat(self, req: Any, metadata: Iterable[Any] | None) -> None:
        """The caller is the worker, and its capacity and layout are the verified ones."""
        self.check_identity(req.worker_id, metadata, "heartbeat")
        facts = self.tokens.facts(req.worker_id)
        if facts is None:
            return
        now = WorkerFacts.of(req.worker_id, facts.role, facts.model, req.stats).capacity()
        was = facts.capacity()
        if now != was:
            raise PermissionDeniedError(
                f"heartbeat refused: worker {req.worker_id!r} reports capacity/layout {now[:2]} {now[2]} "
                f"(max_model_len, sliding_window {now[3:]}) but registered with {was[:2]} {was[2]} "
                f"({was[3:]}); register again to change them"
            )
