"""deploy/prometheus checked by the real ``promtool`` (Debian package ``prometheus``).

``check config`` and ``check rules`` validate the shipped scrape config and alert rules;
``test rules`` runs the alert unit tests of alerts_test.yml. promtool missing is a failure, not
a skip: ``./dev test`` installs it (``apt-get install prometheus``) when run as root.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
RULES = PROM_DIR / "alerts.yml"
RULE_TESTS = PROM_DIR / "alerts_test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not on PATH: install the Debian package `prometheus` (`./dev test` does when run as root)"
        )
    return path


def _run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, cwd=PROM_DIR, check=False
    )


def _assert_ok(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, f"{' '.join(res.args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"


def test_scrape_config_is_valid(promtool):
    res = _run(promtool, "check", "config", str(CONFIG))
    _assert_ok(res)
    assert "SUCCESS" in res.stdout + res.stderr


def test_alert_rules_are_valid(promtool):
    res = _run(promtool, "check", "rules", str(RULES))
    _assert_ok(res)
    n = len(_alert_names())
    assert f"{n} rules found" in res.stdout + res.stderr


def test_alert_rule_unit_tests_pass(promtool):
    res = _run(promtool, "test", "rules", str(RULE_TESTS))
    _assert_ok(res)
    assert "SUCCESS" in res.stdout + res.stderr


def _alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def test_every_alert_has_a_firing_and_a_silent_case():
    """The unit tests are only meaningful if each alert is seen both firing and silent."""
    cases = [
        case for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in t.get("alert_rule_test", [])
    ]
    names = _alert_names()
    assert len(names) == len(set(names)), "duplicate alert names"
    tested = {c["alertname"] for c in cases}
    assert tested == set(names), (
        f"alerts without tests: {set(names) - tested}; unknown: {tested - set(names)}"
    )
    for name in names:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name} never fires in alerts_test.yml"
        assert any(not c.get("exp_alerts") for c in mine), f"{name} is never checked silent"


def test_alerts_are_labelled_and_annotated():
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in {"page", "ticket"}, r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
