"""Real redis-server processes for tests: single servers and a local 3-master Redis Cluster.

Servers listen on free loopback ports with throwaway directories and no persistence. Readiness is
polled with a deadline, never slept on: the server's own log must say it accepts connections (so a
foreign listener on the port cannot pass for it) and a raw-socket PING must be answered. ``kill`` is
kill -9; ``restart`` brings a server back on the same port. Every process started here is killed,
and every directory removed, at interpreter exit as a last resort.
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
CLUSTER_SECONDS = 20.0
_READY = b"Ready to accept connections"
_PORT_BUSY = b"Address already in use"
_LIVE: set[subprocess.Popen[bytes]] = set()
_DIRS: set[Path] = set()


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port(avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A free port whose cluster bus port (port + 10000) is free too; neither may be in ``avoid``."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535 or {port, port + 10000} & avoid:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(
            f"{binary} not found on PATH: install it (apt-get install redis-server) "
            "or run `make test`, which installs it"
        )
    return path


def require_redis_server() -> str:
    """Path of redis-server, or a clear RuntimeError: the suite never skips Redis tests silently."""
    return _require("redis-server")


def require_redis_cli() -> str:
    """Path of redis-cli, or a clear RuntimeError."""
    return _require("redis-cli")


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
    done = subprocess.run(
        [require_redis_cli(), "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.stdout


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class RedisServer:
    """One redis-server on 127.0.0.1, its own port and its own temporary directory."""

    def __init__(
        self, port: int | None = None, extra_args: tuple[str, ...] = (), start_seconds: float = START_SECONDS
    ) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args
        self.start_seconds = start_seconds
        self.dir = Path(tempfile.mkdtemp(prefix=f"llmroute-redis-{self.port}-"))
        _DIRS.add(self.dir)
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """PID of the latest process (None before the first start)."""
        return self.proc.pid if self.proc is not None else None

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self) -> subprocess.Popen[bytes]:
        args = [
            require_redis_server(),
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
        ]
        with self.log.open("wb") as log:  # truncated: readiness is judged on this run's log only
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        _LIVE.add(proc)
        return proc

    def _ready(self) -> bool:
        if _READY not in self.log.read_bytes():
            return False
        reply = ping(self.port) or ""
        return reply == "+PONG" or reply.startswith("-NOAUTH")  # a password-protected server is up too

    def start(self) -> RedisServer:
        """Start the server and wait until it answers; retries briefly while the port is still held."""
        if self.is_running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        deadline = time.monotonic() + self.start_seconds
        failure = ""  # the log of the last attempt that exited
        while True:
            self.proc = self._spawn()
            while self.proc.poll() is None:
                if self._ready():
                    return self
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"redis-server on port {self.port} not ready within {self.start_seconds}s:\n"
                        + (failure or _tail(self.log))
                    )
                time.sleep(0.01)
            _LIVE.discard(self.proc)
            failure = f"(exit {self.proc.returncode})\n{_tail(self.log)}"
            if _PORT_BUSY not in self.log.read_bytes() or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server could not start on port {self.port} {failure}")
            time.sleep(0.05)  # the port is still held (by the previous process, say): try again

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 10 s); safe to call twice."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (kill -9) and wait: a crash, no cleanup on the server's side."""
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        _LIVE.discard(self.proc)

    def restart(self) -> RedisServer:
        """Start again on the same port (killing the current process if it still runs)."""
        self.kill()
        return self.start()

    def cleanup(self) -> None:
        """Kill the process and remove the directory; the server cannot be started again."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        _DIRS.discard(self.dir)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.cleanup()


class RedisCluster:
    """Masters without replicas (3 by default), formed with ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        taken: set[int] = set()
        self.nodes: list[RedisServer] = []
        for _ in range(masters):
            port = free_cluster_port(frozenset(taken))
            taken |= {port, port + 10000}
            cluster_args = ("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf")
            self.nodes.append(RedisServer(port, (*cluster_args, "--cluster-node-timeout", "2000")))

    @property
    def url(self) -> str:
        """URL of the first node, for ``redis.asyncio.cluster.RedisCluster.from_url``."""
        return self.nodes[0].url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self.nodes]

    def _ok(self) -> bool:
        want = f"cluster_known_nodes:{len(self.nodes)}"
        for node in self.nodes:
            try:
                info = command(node.port, "CLUSTER", "INFO")
            except subprocess.TimeoutExpired:
                return False
            if "cluster_state:ok" not in info or want not in info:
                return False
        return True

    def start(self) -> RedisCluster:
        """Start the nodes, create the cluster, and wait until every node reports cluster_state:ok."""
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            create = [require_redis_cli(), "--cluster", "create", *addresses]
            done = subprocess.run(
                [*create, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=CLUSTER_SECONDS,
            )
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
            deadline = time.monotonic() + CLUSTER_SECONDS
            while not self._ok():
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the Redis Cluster did not reach cluster_state:ok in {CLUSTER_SECONDS}s"
                    )
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every node and remove their directories."""
        for node in self.nodes:
            node.cleanup()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()


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
            [require_redis_server(), str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _LIVE.add(self.proc)
        deadline = time.monotonic() + START_SECONDS
        while not self._monitoring(master_port, service):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("redis-sentinel did not start monitoring the master")
            time.sleep(0.05)

    def _monitoring(self, master_port: int, service: str) -> bool:
        try:
            return str(master_port) in command(self.port, "SENTINEL", "get-master-addr-by-name", service)
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        _LIVE.discard(self.proc)


@atexit.register
def _kill_leftovers() -> None:
    """Last resort when a fixture's teardown never ran: kill our children, remove our directories."""
    for proc in list(_LIVE):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    for path in list(_DIRS):
        shutil.rmtree(path, ignore_errors=True)
