"""Request ids and W3C trace context: every request carries both, upstream and in logs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")


def request_id(incoming: str | None) -> str:
    """The client's ``X-Request-ID`` when it is sane (printable, <= 200 chars), else a new one."""
    if incoming and _REQUEST_ID.match(incoming):
        return incoming
    return os.urandom(16).hex()


@dataclass(frozen=True)
class TraceContext:
    """This hop's trace context: ``parent_id`` is the span id sent upstream (the sidecar's own span)."""

    trace_id: str
    parent_id: str
    flags: str
    caller_span: str | None = None
    """The span id of the caller's ``traceparent`` (None when this hop started the trace)."""

    @property
    def sampled(self) -> bool:
        return bool(int(self.flags, 16) & 1)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"


def child_trace(incoming: str | None, sampling_ratio: float = 1.0) -> TraceContext:
    """The trace context to send upstream: the caller's trace with this hop as parent, or a new trace.

    A new trace is sampled by ``sampling_ratio`` (telemetry's ratio; 1 without telemetry) with the rule
    of OpenTelemetry's ``TraceIdRatioBased``, so the flag sent upstream agrees with what is exported.
    """
    match = _TRACEPARENT.match((incoming or "").strip().lower())
    fresh = os.urandom(24).hex()  # this hop's span id, and a trace id should a new trace start
    span = fresh[:16]
    if match and match.group(1) != "ff" and set(match.group(2)) != {"0"} and set(match.group(3)) != {"0"}:
        return TraceContext(match.group(2), span, match.group(4), match.group(3))
    trace_id = fresh[16:]
    sampled = sampling_ratio >= 1.0 or ratio_sampled(trace_id, sampling_ratio)
    return TraceContext(trace_id, span, "01" if sampled else "00")


def ratio_sampled(trace_id: str, ratio: float) -> bool:
    """``TraceIdRatioBased``: the trace id's low 64 bits below ``ratio`` x 2^64."""
    return int(trace_id[16:], 16) < round(ratio * 2**64)
