"""A throw-away kind cluster for the end-to-end suites, and the tools they drive (kubectl, helm, docker).

The suites skip with the reason when a tool is missing or Docker is not usable; ``make e2e`` in CI
installs them (.github/workflows/e2e.yml).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _docker_problem() -> str | None:
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"docker is installed but not usable: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def missing_tools(tools: Sequence[str]) -> str | None:
    """Why the suite cannot run here (a missing tool, an unusable Docker daemon), or None."""
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (this suite needs {', '.join(tools)})"
    return _docker_problem() if "docker" in tools else None


def suite_marks(tools: Sequence[str], timeout: float) -> list[pytest.MarkDecorator]:
    """A suite's ``pytestmark``: skip with the reason when ``tools`` are not usable here, except with
    ``LLMROUTE_E2E_REQUIRED=1`` (CI), where that fails the run instead of passing it unseen."""
    missing = missing_tools(tools)
    if missing is not None and os.environ.get("LLMROUTE_E2E_REQUIRED") == "1":
        pytest.fail(f"LLMROUTE_E2E_REQUIRED=1 but {missing}", pytrace=False)
    return [pytest.mark.skipif(missing is not None, reason=missing or ""), pytest.mark.timeout(timeout)]


class Kind:
    """One kind cluster: its name (for ``kind load``) and a kubeconfig of its own."""

    def __init__(self, name: str, kubeconfig: Path) -> None:
        self.name = name
        self.kubeconfig = kubeconfig

    def _run(
        self, tool: str, args: tuple[str, ...], stdin: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """``tool --kubeconfig … args``; with ``check``, a failure fails the test with its output."""
        done = subprocess.run(
            [tool, "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            assert done.returncode == 0, f"{tool} {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self._run("kubectl", args, stdin, check, timeout)

    def get(self, *args: str) -> Any:
        """``kubectl get -o json``; None when it fails (e.g. not found)."""
        done = self.kubectl("get", "-o", "json", *args, check=False)
        return json.loads(done.stdout) if done.returncode == 0 else None

    def apply(self, *documents: dict[str, Any]) -> None:
        self.kubectl(
            "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": documents})
        )

    def helm(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self._run("helm", args, None, check, timeout)

    def load_image(self, image: str) -> None:
        subprocess.run(["kind", "load", "docker-image", "--name", self.name, image], check=True, timeout=600)


@contextmanager
def kind_cluster(directory: Path) -> Iterator[Kind]:
    """Create a kind cluster (the node image of the installed kind) and delete it afterwards."""
    name = f"llmroute-e2e-{uuid.uuid4().hex[:6]}"
    kubeconfig = directory / "kubeconfig"
    subprocess.run(
        ["kind", "create", "cluster", "--name", name, "--kubeconfig", str(kubeconfig), "--wait", "180s"],
        check=True,
        timeout=600,
    )
    try:
        yield Kind(name, kubeconfig)
    finally:
        subprocess.run(["kind", "delete", "cluster", "--name", name], timeout=300, check=False)


def docker_build(target: str, tag: str) -> str:
    """Build one target of the repository's Dockerfile; returns the tag."""
    subprocess.run(["docker", "build", "--target", target, "-t", tag, str(ROOT)], check=True, timeout=1200)
    return tag
