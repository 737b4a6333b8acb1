"""Driving wrk: the Lua script it runs (POST body, a ``done()`` hook printing JSON), and its result.

wrk is closed-loop: each connection sends its next request when the previous answer has been read to
its end (a streamed SSE answer included: wrk parses the chunked body until the last chunk). The
``done()`` hook prints one line, ``WRK_JSON {...}``, with the request count, the run's duration, the
error counters and exact latency percentiles (wrk keeps a full histogram), so nothing is parsed out
of wrk's human-readable text.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "WRK_JSON "
PERCENTILES = ("p50", "p90", "p99", "p99.9")
SOCKET_ERRORS = ("connect", "read", "write", "timeout")

_DONE_HOOK = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,'
    .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
    .. '"latency_us":{"mean":%.1f,"max":%.1f,"p50":%.1f,"p90":%.1f,"p99":%.1f,"p99.9":%.1f}}\\n',
    MARKER, summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""


def lua_script(body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    """A wrk script POSTing ``body`` as JSON on every request, and printing the result as JSON."""
    text = json.dumps(body, separators=(",", ":"))
    if "]==]" in text:
        raise ValueError("the body cannot be quoted as a Lua long string")
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = [==[{text}]==]",
        'wrk.headers["Content-Type"] = "application/json"',
        *(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in (headers or {}).items()),
        f'MARKER = "{MARKER}"',
    ]
    return "\n".join(lines) + "\n" + _DONE_HOOK


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: counts, its duration in seconds, latencies in milliseconds."""

    requests: int
    seconds: float
    status_errors: int
    """Answers with a status ≥ 400 (what wrk counts as non-2xx/3xx)."""
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]
    """mean, max, p50, p90, p99, p99.9."""
    cpu_seconds: float | None = None
    """CPU time (user + system) the target process spent during the run, when it was read
    (bench/cpu.py); the warm-up is not included."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.status_errors + sum(self.socket_errors.values())

    @property
    def cpu_us_per_request(self) -> float | None:
        """The target's CPU microseconds per completed request (None when its CPU was not read)."""
        if self.cpu_seconds is None or self.requests <= 0:
            return None
        return self.cpu_seconds * 1e6 / self.requests


def parse_output(stdout: str) -> WrkResult:
    """The result the ``done()`` hook printed; ValueError when wrk printed none."""
    line = next((line for line in stdout.splitlines() if line.startswith(MARKER)), None)
    if line is None:
        raise ValueError(f"wrk printed no {MARKER.strip()} line:\n{stdout[-2000:]}")
    data = json.loads(line[len(MARKER) :])
    errors = data["errors"]
    return WrkResult(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        status_errors=int(errors["status"]),
        socket_errors={name: int(errors[name]) for name in SOCKET_ERRORS},
        latency_ms={name: float(value) / 1000 for name, value in data["latency_us"].items()},
    )


def wrk_binary() -> str | None:
    return shutil.which("wrk") or ("/usr/bin/wrk" if Path("/usr/bin/wrk").exists() else None)


def wrk_command(
    wrk: str, url: str, script: Path, connections: int, seconds: float, timeout: float = 10.0
) -> list[str]:
    """One wrk thread (enough for a loopback mock; a second would take a core from the proxies)."""
    return [
        wrk,
        "--threads",
        "1",
        "--connections",
        str(connections),
        "--duration",
        f"{max(1, round(seconds))}s",
        "--timeout",
        f"{max(1, round(timeout))}s",
        "--latency",
        "--script",
        str(script),
        url,
    ]


def run_wrk(
    wrk: str, url: str, script: Path, connections: int, seconds: float, timeout: float = 10.0
) -> WrkResult:
    command = wrk_command(wrk, url, script, connections, seconds, timeout)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + timeout + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout[-2000:]}")
    return parse_output(done.stdout)
