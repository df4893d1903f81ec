"""LoRA adapters the cluster serves: which worker serves which adapter (pure; no gRPC).

Workers name their adapters when they register (``RegisterRequest.adapters``: their ``--lora``
flags; kept on :class:`router.registry.WorkerEntry`). :class:`AdapterCatalog` is a snapshot of
that over the live workers:

* :meth:`AdapterCatalog.check` refuses (ModelNotFoundError, NOT_FOUND) a request naming an
  adapter no live prefill or decode worker serves, so a request for an adapter never gets the
  base model's output;
* :func:`prefer_adapter` is the placement filter: a worker serves an adapter only if it
  registered it (a worker refuses any other with NOT_FOUND), so candidates are narrowed to the
  workers holding it (adapter affinity); a request for the base model keeps every candidate;
* :func:`list_models_response` builds the ListModels answer (the base model with its adapters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from pdserve.errors import ModelNotFoundError
from router.registry import Registry, WorkerEntry, WorkerKind

if TYPE_CHECKING:
    from pdserve.v1 import client_pb2, common_pb2

T = TypeVar("T")


@dataclass(frozen=True)
class AdapterCatalog:
    """``workers[adapter][kind]``: ids of the live workers of that kind serving the adapter."""

    workers: Mapping[str, Mapping[WorkerKind, frozenset[str]]] = field(default_factory=dict)

    @classmethod
    def from_workers(cls, entries: Iterable[WorkerEntry]) -> AdapterCatalog:
        acc: dict[str, dict[WorkerKind, set[str]]] = {}
        for w in entries:
            for a in w.adapters:
                acc.setdefault(a, {}).setdefault(w.kind, set()).add(w.worker_id)
        return cls({a: {k: frozenset(ids) for k, ids in by.items()} for a, by in acc.items()})

    @classmethod
    def from_registry(cls, registry: Registry, model: str | None = None) -> AdapterCatalog:
        """The catalog of ``registry``'s live (not quarantined, not expired) workers, of ``model``
        when given."""
        return cls.from_workers(registry.alive(model=model))

    def names(self) -> list[str]:
        """Every adapter some live worker serves, sorted."""
        return sorted(self.workers)

    def serving(self, adapter: str, kind: WorkerKind) -> frozenset[str]:
        """Ids of the live workers of ``kind`` that serve ``adapter``."""
        return self.workers.get(adapter, {}).get(kind, frozenset())

    def check(
        self, adapter: str, kinds: Sequence[WorkerKind] = (WorkerKind.PREFILL, WorkerKind.DECODE)
    ) -> None:
        """Raise ModelNotFoundError unless ``adapter`` is empty (the base model) or some live
        worker of each of ``kinds`` serves it (a request runs on a prefill and a decode worker)."""
        if not adapter:
            return
        by = self.workers.get(adapter)
        if not by:
            served = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(
                f"LoRA adapter {adapter!r} is not served by this cluster (adapters served: {served})"
            )
        for k in kinds:
            if not by.get(k):
                raise ModelNotFoundError(
                    f"LoRA adapter {adapter!r} is not served by any live {k.value} worker "
                    "(start one with --lora NAME=PATH)"
                )


def prefer_adapter(
    candidates: Sequence[T], adapter: str, holders: frozenset[str], worker_id: Callable[[T], str]
) -> list[T]:
    """Adapter affinity for placement: the ``candidates`` whose ``worker_id(c)`` is in ``holders``
    (the workers serving ``adapter``: :meth:`AdapterCatalog.serving`), in their given order; all
    of them for the base model (``adapter`` empty). Raises ModelNotFoundError when no candidate
    holds the adapter (placing it elsewhere would be refused by the worker)."""
    if not adapter:
        return list(candidates)
    kept = [c for c in candidates if worker_id(c) in holders]
    if not kept:
        raise ModelNotFoundError(f"LoRA adapter {adapter!r} is not served by any candidate worker now")
    return kept


def list_models_response(
    model_id: str,
    max_model_len: int,
    catalog: AdapterCatalog,
    kv_layout: common_pb2.KVLayout | None = None,
) -> client_pb2.ListModelsResponse:
    """ListModels: the base model with the adapters the cluster serves (``ModelInfo.adapters``)."""
    from pdserve.v1 import client_pb2

    info = client_pb2.ModelInfo(id=model_id, max_model_len=max_model_len, adapters=catalog.names())
    if kv_layout is not None:
        info.kv_layout.CopyFrom(kv_layout)
    return client_pb2.ListModelsResponse(models=[info])
