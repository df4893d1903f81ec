"""Fixtures shared by unit-test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def captured(monkeypatch):
    """``pdserve serve`` with its launcher replaced by a fake: the fake records the ClusterSpec
    under ``"spec"`` and stops the command there (SystemExit 0); model paths resolve to
    ``/models/NAME`` without touching disk."""
    import pdserve.launcher as launcher

    seen: dict = {}

    def fake_launch(spec):
        seen["spec"] = spec
        raise SystemExit(0)  # stop before anything starts

    monkeypatch.setattr(launcher, "launch", fake_launch)
    monkeypatch.setattr("pdserve.model_setup.resolve_model_path", lambda m: f"/models/{m or 'default'}")
    return seen
