"""``pdserve serve --prefill 0``: without a prefill worker only the colocated policy can place a
request (decode workers prefill their own). Before, serve started the store, a decode worker and
the router under the default goodput policy, never printed its serving line, and every request
failed UNAVAILABLE "no prefill worker is registered". The launcher is replaced by a fake that
records the ClusterSpec and stops (tests/unit/conftest.py)."""

from __future__ import annotations

import pytest

from pdserve.cli import main


@pytest.mark.parametrize("policy", [[], ["--policy", "goodput"], ["--policy", "least_loaded"]])
def test_prefill_zero_without_the_colocated_policy_is_refused_before_anything_starts(
    captured, capsys, policy
) -> None:
    assert main(["serve", "--tls", "off", "--prefill", "0", *policy]) == 2
    err = capsys.readouterr().err
    assert "--prefill 0 leaves default without a prefill worker" in err and "--policy colocated" in err, err
    assert "spec" not in captured  # nothing launched


def test_prefill_zero_with_the_colocated_policy_starts(captured) -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        main(["serve", "--tls", "off", "--prefill", "0", "--policy", "colocated"])
    # the start-up SIGTERM handler is put back when the launch ends otherwise than by SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    spec = captured["spec"]
    assert spec.num_prefill == 0 and spec.router_args[:2] == ("--policy", "colocated")
