"""The processes ``make demo`` runs: a private ``redis-server`` and sidecar replicas, on loopback.

Each child gets its own session (Ctrl-C in the terminal reaches only the demo, which then stops them
in order) and writes its output to a file in the demo's temporary directory; ``Fleet.stop`` ends them
all, whatever happened before.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

START_SECONDS = 20.0


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    """One started process and its output file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def output_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass(frozen=True)
class Replica:
    """A running sidecar replica's addresses."""

    name: str
    url: str
    admin: str


class Fleet:
    """The demo's child processes; ``stop`` is safe to call at any time, more than once."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.workdir / f"{name}.log"
        out: IO[bytes]
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def start_redis(self) -> str | None:
        """A private redis-server on a free loopback port: its URL, or None when there is none."""
        binary = shutil.which("redis-server")
        if binary is None:
            return None
        port = free_port()
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        child = self._spawn("redis", [*argv, "--dir", str(data)])
        deadline = time.monotonic() + START_SECONDS
        while not _redis_answers(port):
            if child.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{child.output_tail()}")
            time.sleep(0.05)
        return f"redis://127.0.0.1:{port}/0"

    def start_sidecar(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        """``llmroute-sidecar`` with ``argv`` (listening on port 0: the ports come from its log)."""
        command = [sys.executable, "-m", "llmroute_sidecar.cli", *argv]
        return self._spawn(name, command, env)

    def wait_started(self, child: Child) -> Replica:
        """Wait for a sidecar's ``sidecar started`` log record; its traffic and admin addresses."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            record = _find_record(child.log_path, "sidecar started")
            if record is not None:
                return Replica(child.name, f"http://{record['listen']}", f"http://{record['admin']}")
            if child.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sidecar {child.name} did not start:\n{child.output_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM every child's process group (sidecars drain), then SIGKILL what is left after 10 s."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for child in reversed(self.children):
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
        self.children.clear()


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _find_record(path: Path, message: str) -> dict[str, str] | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("{") and f'"msg":"{message}"' in line:
            with contextlib.suppress(ValueError):
                found: dict[str, str] = json.loads(line)
                return found
    return None
