"""Tokens per client, for "who burns the budget": a bounded ``client`` label.

``llmroute_client_tokens_total{route, client}`` counts the tokens of each request (its actual usage)
under the client as the access log names it: the tier when the key has one, else a 12-hex key id
(never a key). A route gets at most ``MAX_CLIENTS_PER_ROUTE`` client labels, in the order clients are
first seen; later ones count under ``other``, requests without a client identity under ``anonymous``.
"""

from __future__ import annotations

from prometheus_client import Counter

from llmroute_sidecar.metrics import SidecarMetrics

MAX_CLIENTS_PER_ROUTE = 100
OTHER_CLIENT = "other"
ANONYMOUS = "anonymous"


class ClientTokens:
    """Counts each finished request's tokens under its (bounded) client label."""

    def __init__(self, metrics: SidecarMetrics, max_clients: int = MAX_CLIENTS_PER_ROUTE) -> None:
        self.metrics = metrics
        self.max_clients = max_clients
        self._children: dict[tuple[str, str], Counter] = {}
        self._clients: dict[str, int] = {}  # route -> distinct client labels bound (fixed ones excluded)

    def count(self, route: str, client: str | None, tokens: int | None) -> None:
        if not tokens or tokens <= 0:
            return
        self._bound(route, client or ANONYMOUS).inc(tokens)

    def _bound(self, route: str, client: str) -> Counter:
        child = self._children.get((route, client))
        if child is not None:
            return child
        if client not in (OTHER_CLIENT, ANONYMOUS):
            if self._clients.get(route, 0) >= self.max_clients:
                return self._bound(route, OTHER_CLIENT)
            self._clients[route] = self._clients.get(route, 0) + 1
        child = self._children[(route, client)] = self.metrics.client_tokens_total.labels(route, client)
        return child
