"""Real redis-server processes for tests: single servers and a local 3-master Redis Cluster.

Servers listen on free loopback ports with throwaway directories and no persistence; readiness is
polled (PING) with a deadline, never slept on. ``kill`` is kill -9; ``restart`` brings a server back
on the same port. Every process started here is also killed at interpreter exit as a last resort.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

START_SECONDS = 10.0
_LIVE: set[subprocess.Popen[bytes]] = set()


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def redis_server_binary() -> str:
    """Path of redis-server, or a clear error: the suite never skips Redis tests silently."""
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(
            "redis-server not found on PATH: install it (apt-get install redis-server) "
            "or run `make test`, which installs it"
        )
    return path


def ping(port: int, timeout: float = 0.5) -> str | None:
    """Send PING over a raw socket; the first reply line, or None when nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).decode(errors="replace").strip()
    except OSError:
        return None


def command(port: int, *args: str, timeout: float = 2.0) -> str:
    """Run one command with redis-cli and return its output."""
    cli = shutil.which("redis-cli") or "redis-cli"
    done = subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, text=True, timeout=timeout
    )
    return done.stdout


class RedisServer:
    """One redis-server on its own port and directory."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args
        self.dir = Path(tempfile.mkdtemp(prefix=f"llmroute-redis-{self.port}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING (retrying while the port lingers)."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            self.proc = subprocess.Popen(
                [
                    redis_server_binary(),
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                    "--dir",
                    str(self.dir),
                    *self.extra_args,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _LIVE.add(self.proc)
            while time.monotonic() < deadline and self.proc.poll() is None:
                reply = ping(self.port) or ""
                if reply == "+PONG" or reply.startswith("-NOAUTH"):  # up (a password-protected one too)
                    return self
                time.sleep(0.02)
            if self.proc.poll() is None:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not answer within {START_SECONDS}s")
            _LIVE.discard(self.proc)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"redis-server could not start on port {self.port}")
            time.sleep(0.05)  # the port is still held by the previous process: try again

    def stop(self) -> None:
        """SIGTERM and wait; safe to call twice."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (kill -9) and wait: a crash, no cleanup on the server's side."""
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        _LIVE.discard(self.proc)

    def restart(self) -> RedisServer:
        """Start again on the same port (after ``kill`` or ``stop``)."""
        self._end(signal.SIGKILL)
        return self.start()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class RedisCluster:
    """Three masters, no replicas, formed with ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(
                port=free_cluster_port(),
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ),
            )
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self.nodes]

    def start(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            cli = shutil.which("redis-cli") or "redis-cli"
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=30,
            )
            deadline = time.monotonic() + START_SECONDS * 2
            while not all("cluster_state:ok" in command(node.port, "CLUSTER", "INFO") for node in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


class SentinelProcess:
    """A redis-sentinel (``redis-server --sentinel``) watching one master as ``mymaster``."""

    def __init__(self, workdir: Path, master_port: int, service: str = "mymaster") -> None:
        self.port = free_port()
        config = workdir / f"sentinel-{self.port}.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {workdir}\n"
            f"sentinel monitor {service} 127.0.0.1 {master_port} 1\n"
        )
        self.proc = subprocess.Popen(
            [redis_server_binary(), str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _LIVE.add(self.proc)
        deadline = time.monotonic() + START_SECONDS
        while f"{master_port}" not in command(self.port, "SENTINEL", "get-master-addr-by-name", service):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("redis-sentinel did not start monitoring the master")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        _LIVE.discard(self.proc)
