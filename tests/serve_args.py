""":func:`serve_worker_args`: the worker flags ``pdserve serve`` would pass to its workers, without
starting anything (the launcher is replaced by one that records the spec and stops)."""

from __future__ import annotations

import pytest


def serve_worker_args(
    monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> tuple[int | None, tuple[str, ...] | None]:
    """Run ``pdserve serve --tls off ARGV`` with the launch stubbed out. Returns ``(rc, args)``:
    ``rc`` is None when the launch was reached (SystemExit) and ``cli.main``'s return code when it
    refused earlier; ``args`` is the launch spec's ``worker_args``, or None when no launch happened."""
    import pdserve.cli as cli
    import pdserve.launcher as launcher

    seen: dict = {}

    def fake_launch(spec):
        seen["args"] = spec.worker_args
        raise SystemExit(0)  # stop before anything starts

    monkeypatch.setattr(launcher, "launch", fake_launch)
    monkeypatch.setattr("pdserve.model_setup.resolve_model_path", lambda m: "/m")
    try:
        rc = cli.main(["serve", "--tls", "off", *argv])
    except SystemExit:
        rc = None
    return rc, seen.get("args")
