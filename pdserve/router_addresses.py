"""Router address lists (pure): what ``--router a:1,b:2`` and ``Client("a:1,b:2")`` accept.

A cluster may run several routers (README, "Several routers"): workers register with every one
of them and clients fail over between them. Both take the list the same way: one string with
commas, or a sequence of such strings (a repeatable flag), in preference order.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.errors import InvalidRequestError


def parse_router_addresses(value: str | Sequence[str], *, what: str = "router address") -> tuple[str, ...]:
    """``value`` split at commas, blanks stripped, duplicates dropped (first kept), in order.

    Raises :class:`InvalidRequestError` naming ``what`` when the list is empty or an entry is not
    ``HOST:PORT`` (a port of 1..65535; ``[v6]:PORT`` and ``unix:`` targets are passed as given)."""
    parts = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise InvalidRequestError(f"{what}: expected HOST:PORT strings, got {part!r}")
        for raw in part.split(","):
            a = raw.strip()
            if not a:
                raise InvalidRequestError(
                    f"{what}: empty entry in {part!r}; expected HOST:PORT[,HOST:PORT...]"
                )
            _check(a, what)
            if a not in out:
                out.append(a)
    if not out:
        raise InvalidRequestError(f"{what}: no address given; expected HOST:PORT[,HOST:PORT...]")
    return tuple(out)


def _check(address: str, what: str) -> None:
    if address.startswith(("unix:", "unix-abstract:")):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequestError(f"{what}: {address!r} is not HOST:PORT (a port in 1..65535)")
