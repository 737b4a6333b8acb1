"""Request ids and W3C trace context: every request carries both, upstream and in logs."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")


def request_id(incoming: str | None) -> str:
    """The client's ``X-Request-ID`` when it is sane (printable, <= 200 chars), else a new one."""
    if incoming and _REQUEST_ID.match(incoming):
        return incoming
    return secrets.token_hex(16)


@dataclass(frozen=True)
class TraceContext:
    trace_id: str
    parent_id: str
    flags: str

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"


def child_trace(incoming: str | None) -> TraceContext:
    """The trace context to send upstream: the caller's trace with this hop as parent, or a new trace."""
    match = _TRACEPARENT.match((incoming or "").strip().lower())
    span = secrets.token_hex(8)
    if match and match.group(1) != "ff" and set(match.group(2)) != {"0"} and set(match.group(3)) != {"0"}:
        return TraceContext(match.group(2), span, match.group(4))
    return TraceContext(secrets.token_hex(16), span, "01")
