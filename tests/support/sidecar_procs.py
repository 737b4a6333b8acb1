"""Real ``llmroute-sidecar`` and mock-upstream processes for tests, on free loopback ports.

Each process's output is read by a thread into a list of lines (JSON log lines parsed), so tests
can wait for a log record with a deadline instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


STARTUP_SECONDS = 20.0


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """A plain GET: (status, body); (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Signal a child (SIGTERM by default), kill it when it outlives ``timeout``; safe when it is gone."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ManagedProcess:
    """A child process whose output lines are collected by a reader thread."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.argv = argv
        self.lines: list[str] = []
        self._lock = threading.Lock()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def records(self) -> list[dict[str, Any]]:
        """Output lines that are JSON objects (structured logs)."""
        with self._lock:
            lines = list(self.lines)
        found = []
        for line in lines:
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def access_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("msg") == "access"]

    def wait_record(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        try:
            found: dict[str, Any] = wait_for(
                lambda: next((r for r in self.records() if match(r)), None), timeout, what="a log record"
            )
        except AssertionError as error:
            raise AssertionError(f"{error}; the process printed:\n{self.output()[-4000:]}") from None
        return found

    async def record(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """``wait_record`` for async tests: polls without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((r for r in self.records() if match(r)), None)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for a log record:\n{self.output()[-4000:]}"
                )
            await asyncio.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        """Terminate (then kill) the process and its session; always safe to call."""
        if self.alive:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._reader.join(5)


class MockUpstream(ManagedProcess):
    """``python -m llmroute_sidecar.mockupstream`` on a free port."""

    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        super().__init__(
            [
                sys.executable,
                "-m",
                "llmroute_sidecar.mockupstream",
                "--listen",
                f"127.0.0.1:{self.port}",
                *extra,
            ]
        )
        wait_for(lambda: http_get(f"{self.url}/health")[0] == 200 or not self.alive, STARTUP_SECONDS)
        if not self.alive:
            raise RuntimeError(f"mock upstream failed to start:\n{self.output()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        """Let every stream held with ``X-Mock-Hold: 1`` go on."""
        request = urllib.request.Request(f"{self.url}/mock/release", method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()


class SidecarProcess(ManagedProcess):
    """``llmroute-sidecar --route FILE`` on free ports, started and waited for."""

    def __init__(
        self,
        route_file: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
    ) -> None:
        self.route_file = route_file
        self.port = free_port()
        self.admin_port = free_port()
        super().__init__(
            [
                sys.executable,
                "-m",
                "llmroute_sidecar.cli",
                "--route",
                str(route_file),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--admin-listen",
                f"127.0.0.1:{self.admin_port}",
                *extra,
            ],
            env={"LLMROUTE_WATCH_INTERVAL": "0.1", "LLMROUTE_HEALTH_INTERVAL": "0.1", **(env or {})},
        )
        if wait_ready:
            # Its own "sidecar started" line too: a /healthz answer alone may come from another
            # process that took the port this one then failed to bind (ports are picked, then freed).
            wait_for(
                lambda: (
                    (http_get(f"{self.admin}/healthz")[0] == 200 and "sidecar started" in self.output())
                    or not self.alive
                ),
                STARTUP_SECONDS,
            )
            if not self.alive:
                raise RuntimeError(f"sidecar failed to start:\n{self.output()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def readyz(self) -> tuple[int, dict[str, Any]]:
        status, body = http_get(f"{self.admin}/readyz")
        return status, (json.loads(body) if body.startswith("{") else {})

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
        _, text = http_get(f"{self.admin}/metrics")
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{key}="{val}"' in head for key, val in labels.items()):
                total += float(value)
        return total


def start(started: list[SidecarProcess], route: Path, *extra: str, **kwargs: Any) -> SidecarProcess:
    """Start a sidecar and record it in ``started`` (the ``sidecars`` fixture stops them all)."""
    process = SidecarProcess(route, *extra, **kwargs)
    started.append(process)
    return process


async def hold_stream(session: aiohttp.ClientSession, base: str, **body: Any) -> aiohttp.ClientResponse:
    """Open a chat stream the mock upstream holds after its first event; return once that event arrived."""
    payload = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "stream": True, **body}
    response = await session.post(f"{base}/v1/chat/completions", json=payload, headers={"X-Mock-Hold": "1"})
    await response.content.readuntil(b"\n\n")
    return response


def operator_command(
    namespace: str,
    webhook_port: int,
    metrics_port: int | None = None,
    peering: str | None = None,
    *extra: str,
    insecure: bool = True,
) -> list[str]:
    """``llmroute-operator`` for one namespace with a plain-HTTP webhook server (HTTPS when not
    ``insecure``); standalone unless ``peering`` names a peering object; the metrics endpoint only when
    ``metrics_port`` is given; ``extra`` flags appended."""
    return [
        str(Path(sys.executable).parent / "llmroute-operator"),
        *(["--peering", peering] if peering else ["--standalone"]),
        "--namespace",
        namespace,
        "--webhook-listen",
        f"127.0.0.1:{webhook_port}",
        *(["--webhook-insecure"] if insecure else []),
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}" if metrics_port else "off",
        *extra,
    ]
