"""``make demo``: the fleet headline, tokens that agree with the sidecars, the SDK's retry policy and
cleanup of every process it starts (also on Ctrl-C)."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from llmroute_sidecar.demo import counted_tokens, retry_delay
from tests.support.sidecar_procs import ManagedProcess, wait_for

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


def _addresses(output: str) -> list[str]:
    """Every loopback URL the demo printed (replicas' traffic and admin ports, mock, redis)."""
    return re.findall(r"(?:http|redis)://127\.0\.0\.1:\d+", output)


def _nothing_listens(output: str) -> None:
    for url in _addresses(output):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


@needs_redis
def test_demo_shows_the_fleet_result_and_agreeing_tokens() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llmroute_sidecar.demo", "--seconds", "3"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "3 sidecar replicas sharing one redis-server" in out
    fleet = re.search(r"fleet result: 3 replicas admitted (\d+) of mallory's requests, not 60", out)
    assert fleet is not None, out
    assert 0 < int(fleet.group(1)) <= 20
    tokens = re.search(r"clients saw (\d+) in usage; the sidecars counted (\d+)", out)
    assert tokens is not None and tokens.group(1) == tokens.group(2) and int(tokens.group(1)) > 0, out
    assert "Retry-After:" in out and "result: OK" in out
    _nothing_listens(out)


def test_demo_without_redis_runs_one_sidecar_with_a_note() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llmroute_sidecar.demo", "--seconds", "2", "--memory"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "NOTE --memory was given, so ONE sidecar runs on the in-process memory store" in done.stdout
    assert "result on one replica: admitted" in done.stdout


@needs_redis
def test_ctrl_c_stops_every_process_the_demo_started() -> None:
    demo = ManagedProcess([sys.executable, "-m", "llmroute_sidecar.demo", "--seconds", "30"])
    try:
        wait_for(lambda: "driving" in demo.output() or not demo.alive, 60, what="traffic to start")
        assert demo.alive, demo.output()
        demo.signal(signal.SIGINT)
        assert demo.wait_exit(30) == 130
    finally:
        demo.stop()
    assert "interrupted; stopping its processes" in demo.output()
    assert len(_addresses(demo.output())) >= 7  # redis, 3 x (traffic, admin), mock upstream
    _nothing_listens(demo.output())


def test_retry_delay_follows_the_openai_sdk() -> None:
    assert retry_delay({"retry-after-ms": "1500", "Retry-After": "2"}, 0) == 1.5
    assert retry_delay({"Retry-After": "7"}, 0) == 7.0
    # beyond two minutes (or absent) the SDK backs off exponentially: 0.5 s, 1 s, ... at most 8 s
    assert 0.375 <= retry_delay({"Retry-After": "600"}, 0) <= 0.5
    assert 0.75 <= retry_delay({}, 1) <= 1.0
    assert 6.0 <= retry_delay({}, 10) <= 8.0


def test_counted_tokens_adds_prompt_and_completion_of_every_replica() -> None:
    one = 'llmroute_tokens_total{kind="prompt",route="d/r"} 10.0\n'
    one += 'llmroute_tokens_total{kind="reserved",route="d/r"} 99.0\n'
    two = 'llmroute_tokens_total{kind="completion",route="d/r"} 5.0\n# HELP x\n'
    assert counted_tokens([one, two]) == 15
