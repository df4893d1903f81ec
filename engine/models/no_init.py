"""Build a model's modules without initialising their parameters (a checkpoint overwrites them).

``torch.nn`` modules initialise their parameters in their constructors (``reset_parameters``:
``torch.nn.init.normal_``, ``kaiming_uniform_``, ...). For a model whose every parameter is then
loaded from a checkpoint that is wasted start-up time: on SmolLM2-135M about a second of random
numbers on CPU, and building on the ``meta`` device instead costs as much again, because every op
under ``torch.device("meta")`` goes through ``torch._refs``, whose first use imports
``torch._dynamo`` (1-2 s on a 2-core host; nothing else in a worker needs it).

:func:`skip_param_init` makes the ``torch.nn.init`` functions return their tensor untouched, for
the calling thread only, while it is entered: a module built meanwhile on another thread (a LoRA
adapter's zero-initialised B, a test's reference model) is initialised as usual. Parameters built
under it hold whatever memory ``torch.empty`` gave them; the caller must overwrite every one of
them (:func:`engine.models.loader.load_model` loads each from the checkpoint and refuses a
checkpoint that lacks one). Buffers computed in constructors (rotary tables) are unaffected: they
are made by ordinary ops, not by ``torch.nn.init``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

# every torch.nn.init function a torch.nn module's reset_parameters calls, and their relatives
_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)

_state = threading.local()  # .depth: how many skip_param_init the thread is in
_install_lock = threading.Lock()


def _skippable(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if getattr(_state, "depth", 0):
            return tensor
        return fn(tensor, *args, **kwargs)

    init.__pdserve_skippable__ = True  # type: ignore[attr-defined]
    return init


def _install() -> None:
    """Wrap each ``torch.nn.init`` function that is not wrapped (they behave as before outside
    :func:`skip_param_init`). Checked on every entry, not once per process: another library may
    swap the functions out and back meanwhile (transformers' ``no_init_weights`` sets no-ops and
    restores, on exit, the functions it found on entry: entered before our first wrap, it restores
    torch's own and drops our wrappers); a dropped wrapper is put back at the next entry."""
    with _install_lock:
        for name in _INIT_FUNCTIONS:
            fn = getattr(torch.nn.init, name, None)
            if fn is not None and not getattr(fn, "__pdserve_skippable__", False):
                setattr(torch.nn.init, name, _skippable(fn))


@contextlib.contextmanager
def skip_param_init() -> Iterator[None]:
    """While entered, ``torch.nn.init`` leaves tensors as they are on this thread (module doc)."""
    _install()
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
