"""One kind cluster for the whole end-to-end session (created on first use, deleted at the end)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e.cluster import Kind, kind_cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kind]:
    with kind_cluster(tmp_path_factory.mktemp("kind")) as created:
        yield created
