"""pdserve.tracing: log_event's records on the request path (#12: cheap) and their JSON lines."""

from __future__ import annotations

import io
import json
import logging

import pytest

from pdserve.tracing import JsonFormatter, log_event, request_scope


def _logger(name: str, level: int) -> tuple[logging.Logger, io.StringIO]:
    log = logging.getLogger(name)
    log.propagate = False
    log.setLevel(level)
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(JsonFormatter("router"))
    log.handlers[:] = [h]
    return log, buf


def test_a_disabled_level_makes_no_record():
    log, buf = _logger("pdserve.test.disabled", logging.WARNING)

    def no_record(*a, **k):
        raise AssertionError("a record was made for a disabled level")

    log.makeRecord = no_record  # type: ignore[method-assign]
    log_event(log, "routed", prefill="p0")  # INFO < WARNING
    assert buf.getvalue() == ""


def test_an_emitted_record_is_one_json_line_with_its_fields_and_the_bound_id():
    log, buf = _logger("pdserve.test.emitted", logging.INFO)
    with request_scope("req-7"):
        log_event(log, "request done", completion_tokens=32, ttft_s=0.01, _private=1, obj=object)
    log_event(log, "other", request_id="given", ok=True)
    first, second = (json.loads(x) for x in buf.getvalue().splitlines())
    assert first["msg"] == "request done" and first["level"] == "info" and first["component"] == "router"
    assert first["logger"] == "pdserve.test.emitted" and first["request_id"] == "req-7"
    assert first["completion_tokens"] == 32 and first["ttft_s"] == 0.01 and "_private" not in first
    assert first["obj"] == str(object)  # what JSON cannot hold is str()
    assert {"pathname", "lineno", "funcName", "args"}.isdisjoint(first)
    assert second["request_id"] == "given" and second["ok"] is True


def test_a_field_named_as_a_record_attribute_is_refused():
    log, _ = _logger("pdserve.test.clash", logging.INFO)
    with pytest.raises(KeyError):
        log_event(log, "x", name="clash")
