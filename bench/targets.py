"""The processes a benchmark run starts: mock upstream, nginx, the floor, sidecars, redis-server.

Every process writes its output to a file in the run's work directory (not to a pipe the harness
would have to read: that reader would compete for the cores it measures). Sidecars run as shipped:
``LLMROUTE_LOG_LEVEL=INFO``, one JSON access-log line per request on stdout, default intervals.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.sidecar_procs import free_port, http_get, wait_for

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 20.0
ZERO_LATENCY = ("--first-token-latency", "0", "--token-interval", "0", "--json-latency", "0")

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream backend {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


@dataclass
class Proc:
    """A child process in its own session, its output in ``log``; ``url`` answers once it is up."""

    name: str
    argv: list[str]
    log: Path
    url: str
    ready_url: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env or None,
                cwd=ROOT,
                start_new_session=True,
            )
        try:
            wait_for(
                lambda: not self.alive or http_get(self.ready_url, timeout=2)[0] == 200,
                STARTUP_SECONDS,
                interval=0.05,
                what=f"{self.name} at {self.ready_url}",
            )
        except AssertionError:
            self.stop()
            raise RuntimeError(f"{self.name} did not come up:\n{self.tail()}") from None
        if not self.alive:
            raise RuntimeError(f"{self.name} exited at start-up:\n{self.tail()}")
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def stop(self) -> None:
        """SIGTERM to its session, SIGKILL after 10 s; safe to call twice."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def _env(**extra: str) -> dict[str, str]:
    """This environment without any LLMROUTE_* setting (the shipped defaults apply), plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLMROUTE_")}
    return {**base, "PYTHONUNBUFFERED": "1", **extra}


def mock_upstream(workdir: Path, *timings: str) -> Proc:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "llmroute_sidecar.mockupstream", "--listen", f"127.0.0.1:{port}", *timings]
    return Proc("mock upstream", argv, workdir / "mock.log", url, f"{url}/health", _env()).start()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def nginx(workdir: Path, upstream: str) -> Proc:
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed")
    port = free_port()
    upstream_port = int(upstream.rsplit(":", 1)[1])
    home = workdir / "nginx"
    home.mkdir(exist_ok=True)
    conf = home / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=home, upstream=upstream_port, port=port))
    url = f"http://127.0.0.1:{port}"
    argv = [binary, "-c", str(conf), "-p", str(home)]
    return Proc("nginx", argv, workdir / "nginx.log", url, f"{url}/health").start()


def floor(workdir: Path, upstream: str, redis_url: str) -> Proc:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable,
        str(ROOT / "bench" / "floor.py"),
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        upstream,
        "--redis",
        redis_url,
    ]
    return Proc("floor", argv, workdir / "floor.log", url, f"{url}/health", _env()).start()


def sidecar(workdir: Path, route: Path, name: str, *store: str) -> Proc:
    """``llmroute-sidecar`` with ``store`` flags (``--store memory`` or ``--redis URL``), logs at INFO."""
    port, admin = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "llmroute_sidecar.cli",
        "--route",
        str(route),
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        *store,
    ]
    env = _env(LLMROUTE_LOG_LEVEL="INFO")
    url = f"http://127.0.0.1:{port}"
    return Proc(name, argv, workdir / f"{name}.log", url, f"http://127.0.0.1:{admin}/readyz", env).start()


def access_lines(log: Path) -> int:
    """How many access-log records a sidecar wrote (the check that logs really were on)."""
    try:
        with log.open("rb") as lines:
            return sum(1 for line in lines if b'"msg":"access"' in line)
    except OSError:
        return 0
