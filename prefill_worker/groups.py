"""The prefill worker's part of a parallel-sampling request (pure): what it prefills.

A request with ``SamplingParams.n > 1`` or ``best_of > 1`` is prefilled once for all its choices:
every prompt token but the last, prefill-only, with a greedy one-token run whose token is
discarded (the engine's own group parent, ``engine.parallel_sampling``). The decode worker adopts
those blocks with ``LLMEngine.import_kv_group`` and forks the choices; each computes the last
prompt token into its own copy of the shared partial block and samples with ``seed + i``, so
the handoff changes no token.
"""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError


def group_prefix(
    ids: list[int], params: SamplingParams, adapter: str = ""
) -> tuple[list[int], SamplingParams]:
    """``(tokens to prefill, their sampling)`` for the group request ``ids``/``params``
    (``params.num_candidates > 1``). Raises InvalidRequestError naming what is not supported: a
    LoRA adapter (as the engine refuses), a prompt of one token (nothing to share: the router
    runs such a group on a decode worker with ``local_prefill``)."""
    name = f"n={params.n}, best_of={params.best_of}"
    if params.num_candidates < 2:
        raise InvalidRequestError(f"{name}: not a parallel-sampling request")
    if adapter:
        raise InvalidRequestError(
            f"{name} is not supported with a LoRA adapter (adapter {adapter!r}) yet: send n=1"
        )
    if len(ids) < 2:
        raise InvalidRequestError(
            f"{name} with a 1-token prompt has no prompt KV to hand off: send it with local_prefill"
        )
    return ids[:-1], SamplingParams.greedy_params(1, ignore_eos=True)
