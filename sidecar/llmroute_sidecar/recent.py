"""The last quota rejections of this sidecar, for people: served on the admin port as ``/rejections``.

A small ring (``KEPT`` entries), written only on the rejection path; each entry says when, which
limit and dimension, the client as the access log names it (a tier or a key id, never a key), the
status (429, or 400 for a request that can never fit) and the Retry-After given. ``llmroute-operator
status`` merges the rings of a route's sidecars into its "last rejections".
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

#: Rejections kept per sidecar.
KEPT = 50


@dataclass(frozen=True)
class Rejection:
    """One rejected request."""

    ts: float
    """Unix time, seconds."""
    request_id: str
    limit: str
    dimension: str
    scope: str
    client: str | None
    status: int
    retry_after_seconds: float | None
    """What Retry-After said (None for a 400: retrying does not help)."""


class RecentRejections:
    """A bounded, newest-last record of rejections."""

    def __init__(self, kept: int = KEPT) -> None:
        self._ring: deque[Rejection] = deque(maxlen=kept)

    def add(self, rejection: Rejection) -> None:
        self._ring.append(rejection)

    def record(
        self,
        request_id: str,
        limit: str,
        dimension: str,
        scope: str,
        client: str | None,
        status: int,
        retry_after_seconds: float | None,
    ) -> None:
        """Add one rejection that happened now."""
        self.add(
            Rejection(time.time(), request_id, limit, dimension, scope, client, status, retry_after_seconds)
        )

    def newest_first(self) -> list[dict[str, Any]]:
        """The kept rejections as JSON values, newest first."""
        return [asdict(rejection) for rejection in reversed(self._ring)]
