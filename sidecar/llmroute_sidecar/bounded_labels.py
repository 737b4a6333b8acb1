"""A label whose values are bounded per route: the first ``limit`` values seen keep their name, later
ones share ``other``. Keeps Prometheus series finite when a label comes from requests (models,
clients). Values in ``fixed`` are always kept and not counted against the limit."""

from __future__ import annotations

from collections.abc import Collection

OTHER = "other"


class BoundedLabel:
    """Maps (route, value) to the label value to use: ``value`` itself, or ``other`` once full."""

    def __init__(self, limit: int, fixed: Collection[str] = ()) -> None:
        self.limit = limit
        self.fixed = frozenset({OTHER, *fixed})
        self._seen: dict[str, set[str]] = {}  # route -> values given their own label

    def __call__(self, route: str, value: str) -> str:
        if value in self.fixed:
            return value
        seen = self._seen.setdefault(route, set())
        if value in seen:
            return value
        if len(seen) >= self.limit:
            return OTHER
        seen.add(value)
        return value
