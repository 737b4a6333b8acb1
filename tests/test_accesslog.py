"""JSON log lines and the access log: fields, no raw keys, no query strings, exceptions."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from llmroute_sidecar.accesslog import AccessLog, AccessRecord, configure_logging, key_id, strip_query

RAW_KEY = "sk-live-0123456789abcdefSECRET"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """The root logger writing JSON into a buffer; the root logger is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    buffer = io.StringIO()
    configure_logging("DEBUG", stream=buffer)
    yield buffer
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _record(**overrides: Any) -> AccessRecord:
    values: dict[str, Any] = {
        "request_id": "req-1",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "route": "team-a/chat",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "outcome": "ok",
        "duration_ms": 812.5,
        "upstream_ms": 800.25,
        "attempts": 2,
        "stream": True,
        "tokens_reserved": 1200,
        "tokens_actual": 640,
        "limit": None,
        "client": "gold",
        "queue_wait_ms": 3.5,
        "client_disconnected": False,
        "error": None,
    }
    values.update(overrides)
    return AccessRecord(**values)


def test_log_line_shape(stream: io.StringIO) -> None:
    logging.getLogger("llmroute.test").warning("hello %s", "world", extra={"fields": {"a": 1, "b": "x"}})
    (line,) = _lines(stream)
    assert line["level"] == "WARNING"
    assert line["logger"] == "llmroute.test"
    assert line["msg"] == "hello world"
    assert line["a"] == 1 and line["b"] == "x"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    assert "exc" not in line


def test_one_object_per_line_even_with_newlines(stream: io.StringIO) -> None:
    log = logging.getLogger("llmroute.test")
    log.info("first\nline")
    log.info("second", extra={"fields": {"obj": object()}})  # not JSON-serialisable: rendered as str
    lines = _lines(stream)
    assert [line["msg"] for line in lines] == ["first\nline", "second"]
    assert lines[1]["obj"].startswith("<object object")


def test_fields_cannot_overwrite_core_keys(stream: io.StringIO) -> None:
    logging.getLogger("llmroute.test").info("real", extra={"fields": {"msg": "fake", "level": "x"}})
    (line,) = _lines(stream)
    assert line["msg"] == "real" and line["level"] == "INFO"
    assert line["field_msg"] == "fake" and line["field_level"] == "x"


def test_exceptions_rendered(stream: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("llmroute.test").exception("failed", extra={"fields": {"request_id": "r"}})
    (line,) = _lines(stream)
    assert line["level"] == "ERROR"
    assert line["request_id"] == "r"
    assert "Traceback" in line["exc"]
    assert "RuntimeError: boom" in line["exc"]


def test_level_filters(stream: io.StringIO) -> None:
    configure_logging("warning", stream=stream)
    logging.getLogger("llmroute.test").info("hidden")
    logging.getLogger("llmroute.test").error("shown")
    assert [line["msg"] for line in _lines(stream)] == ["shown"]


def test_configure_is_idempotent(stream: io.StringIO) -> None:
    configure_logging("INFO", stream=stream)
    configure_logging("INFO", stream=stream)
    logging.getLogger("llmroute.test").info("once")
    assert len(_lines(stream)) == 1


def test_access_line_has_all_fields(stream: io.StringIO) -> None:
    AccessLog().write(_record(limit="per-key-tpm", status=429, outcome="quota_rejected"))
    (line,) = _lines(stream)
    assert line["msg"] == "access"
    assert line["logger"] == "llmroute.access"
    assert line["level"] == "INFO"
    expected = {
        "request_id": "req-1",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "route": "team-a/chat",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 429,
        "outcome": "quota_rejected",
        "duration_ms": 812.5,
        "upstream_ms": 800.25,
        "attempts": 2,
        "stream": True,
        "tokens_reserved": 1200,
        "tokens_actual": 640,
        "limit": "per-key-tpm",
        "client": "gold",
        "queue_wait_ms": 3.5,
        "client_disconnected": False,
        "error": None,
    }
    assert {key: line[key] for key in expected} == expected


def test_optional_fields_default(stream: io.StringIO) -> None:
    record = AccessRecord("r", "t", "ns/route", "GET", "/v1/models", 200, "ok", 1.0)
    AccessLog().write(record)
    (line,) = _lines(stream)
    assert line["upstream_ms"] is None and line["tokens_actual"] is None and line["client"] is None


def test_key_id() -> None:
    ident = key_id(RAW_KEY)
    assert re.fullmatch(r"[0-9a-f]{12}", ident)
    assert ident == key_id(RAW_KEY)
    assert ident != key_id(RAW_KEY + "x")
    # sha256("abc") starts with ba7816bf8f01.
    assert key_id("abc") == "ba7816bf8f01"


def test_raw_key_never_logged(stream: io.StringIO) -> None:
    AccessLog().write(_record(client=key_id(RAW_KEY), path=f"/v1/chat/completions?api_key={RAW_KEY}"))
    output = stream.getvalue()
    assert RAW_KEY not in output
    assert key_id(RAW_KEY) in output


def test_query_string_stripped(stream: io.StringIO) -> None:
    AccessLog().write(_record(path="/v1/completions?key=secret&x=1"))
    (line,) = _lines(stream)
    assert line["path"] == "/v1/completions"
    assert "secret" not in stream.getvalue()


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/a", "/a"), ("/a?b=c", "/a"), ("/a?", "/a"), ("/a#frag", "/a"), ("/a?b=c#d", "/a"), ("", "")],
)
def test_strip_query(path: str, expected: str) -> None:
    assert strip_query(path) == expected


def test_access_log_with_custom_logger() -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("llmroute.test.custom")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    AccessLog(logger).write(_record())
    (record,) = records
    assert record.getMessage() == "access"
    assert record.fields["route"] == "team-a/chat"  # type: ignore[attr-defined]


class CountingStream(io.StringIO):
    """A stream that counts its writes (stdout is unbuffered in the images: one write, one syscall)."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def shipped() -> Iterator[CountingStream]:
    """Logging as the sidecar configures it: one JSON handler on the root logger. Tests call
    ``only_ours()`` in their body: pytest adds its capturing handlers for the test's call phase."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    out = CountingStream()
    configure_logging("INFO", stream=out)
    yield out
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def only_ours() -> None:
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if type(h).__name__ == "_JsonHandler"]


def test_shipped_path_writes_what_the_formatter_would(shipped: CountingStream) -> None:
    """The direct line and the one through ``logging`` differ only in their timestamp."""
    stream = shipped
    only_ours()
    record = _record(path="/v1/chat/completions?k=1", error='upstream said "no" \u00e9')
    AccessLog().write(record)
    assert stream.writes == 1  # outside an event loop the direct path writes at once
    logging.getLogger().addFilter(lambda _: True)  # any filter: the record goes through logging
    try:
        AccessLog().write(record)
    finally:
        logging.getLogger().filters.clear()
    direct, via_logging = _lines(stream)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", direct["ts"])
    assert list(direct) == list(via_logging)
    del direct["ts"], via_logging["ts"]
    assert direct == via_logging


async def test_lines_of_one_loop_turn_are_written_at_once(shipped: CountingStream) -> None:
    out = shipped
    only_ours()
    log = AccessLog()
    for n in range(5):
        log.write(_record(request_id=f"r{n}"))
    assert out.writes == 0  # pending until the loop turns
    await asyncio.sleep(0)
    assert out.writes == 1
    assert [json.loads(line)["request_id"] for line in out.getvalue().splitlines()] == [
        f"r{n}" for n in range(5)
    ]
    log.write(_record(request_id="last"))
    log.flush()  # what the sidecar does when it stops
    assert out.writes == 2 and "last" in out.getvalue()


def test_other_listeners_get_the_record_through_logging(
    shipped: CountingStream, caplog: pytest.LogCaptureFixture
) -> None:
    only_ours()
    logging.getLogger().addHandler(caplog.handler)
    try:
        AccessLog().write(_record())
    finally:
        logging.getLogger().removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records] == ["access"]  # the other handler saw it
    assert json.loads(shipped.getvalue())["msg"] == "access"  # and the JSON handler still wrote it
