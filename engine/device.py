"""The torch device an engine runs on, checked against this machine before anything loads."""

from __future__ import annotations

import torch

from pdserve.errors import InvalidRequestError

SUPPORTED_TYPES = ("cpu", "cuda")


def checked_device(name: str) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:N``) as a torch.device this process can use.

    Raises InvalidRequestError naming the device when it cannot: a string torch does not parse, a
    device type the engine does not run on, CUDA asked of a torch built without it or of a
    machine with no CUDA device, or an index past the devices there are. (Before, ``--device
    cuda`` on a CPU-only machine loaded the model and failed in ``Module.to`` with torch's
    AssertionError traceback.)"""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise InvalidRequestError(
            f"device {name!r} is not a torch device ({e}): use cpu, cuda or cuda:N"
        ) from None
    if device.type not in SUPPORTED_TYPES:
        raise InvalidRequestError(
            f"device {name!r}: the engine runs on {' or '.join(SUPPORTED_TYPES)}, not {device.type}"
        )
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise InvalidRequestError(
                f"device {name!r}: this torch ({torch.__version__}) is built without CUDA: use --device cpu, "
                "or install a CUDA build of torch"
            )
        n = torch.cuda.device_count()
        if n == 0:
            raise InvalidRequestError(
                f"device {name!r}: no CUDA device is visible to this process: use --device cpu"
            )
        if device.index is not None and device.index >= n:
            raise InvalidRequestError(
                f"device {name!r}: this process sees {n} CUDA device(s) (cuda:0 to cuda:{n - 1})"
            )
    return device
