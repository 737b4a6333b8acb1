"""Tokens per client, for "who burns the budget": a bounded ``client`` label.

``llmroute_client_tokens_total{route, client}`` counts the tokens of each request (its actual usage)
under the client as the access log names it: the tier when the key has one, else a 12-hex key id
(never a key). A route gets at most ``MAX_CLIENTS_PER_ROUTE`` client labels, in the order clients are
first seen; later ones count under ``other``, requests without a client identity under ``anonymous``.
"""

from __future__ import annotations

from llmroute_sidecar.bounded_labels import OTHER, BoundedLabel
from llmroute_sidecar.metrics import SidecarMetrics

MAX_CLIENTS_PER_ROUTE = 100
OTHER_CLIENT = OTHER
ANONYMOUS = "anonymous"


class ClientTokens:
    """Counts each finished request's tokens under its (bounded) client label."""

    def __init__(self, metrics: SidecarMetrics, max_clients: int = MAX_CLIENTS_PER_ROUTE) -> None:
        self.metrics = metrics
        self._client = BoundedLabel(max_clients, fixed=(ANONYMOUS,))

    def count(self, route: str, client: str | None, tokens: int | None) -> None:
        if not tokens or tokens <= 0:
            return
        label = self._client(route, client or ANONYMOUS)
        self.metrics.client_tokens_total.labels(route, label).inc(tokens)
