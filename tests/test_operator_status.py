"""``llmroute-operator status`` as a real process: the Kubernetes emulator holds an LLMRoute and its
pods, a real sidecar process has admitted traffic into a real redis-server, and the command prints
what was admitted, held and rejected."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llmroute_operator.quota_usage import read_usage
from llmroute_operator.route_status_view import limit_queries
from llmroute_sidecar.api import parse_route
from llmroute_sidecar.policy import sha256_hex
from tests.support.kube_emulator import EmulatorThread, write_kubeconfig
from tests.support.redis_procs import RedisServer
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, free_port, http_get, start, wait_for

NAMESPACE = "tests"
ROUTE = "chat"
OPERATOR = str(Path(sys.executable).parent / "llmroute-operator")
ROUTES = f"/apis/llmroute.dev/v1alpha1/namespaces/{NAMESPACE}/llmroutes"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"


def route_document(upstream: str) -> dict[str, Any]:
    return {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": ROUTE, "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": {"app": "chat"}},
            "upstream": {"url": upstream},
            "limits": [
                {
                    "name": "global",
                    "key": "route",
                    "requestsPerMinute": 100,
                    "tokensPerMinute": 100000,
                    "concurrentRequests": 10,
                },
                {"name": "tenant", "key": "header:X-Tenant-ID", "requestsPerMinute": 5},
            ],
        },
    }


def pod(name: str, labels: dict[str, str], sidecar: SidecarProcess | None, redis_url: str) -> dict[str, Any]:
    """A pod as the API server would hold it once running; with ``sidecar``, injected and pointing at
    that real process's admin port on 127.0.0.1."""
    containers: list[dict[str, Any]] = [{"name": "app", "image": "app:1"}]
    statuses = [{"name": "app", "ready": sidecar is not None}]
    if sidecar is not None:
        containers.append(
            {
                "name": "llmroute-sidecar",
                "image": "sidecar:1",
                "ports": [{"name": "llmroute-admin", "containerPort": sidecar.admin_port}],
                "env": [{"name": "LLMROUTE_REDIS_URL", "value": redis_url}],
            }
        )
        statuses.append({"name": "llmroute-sidecar", "ready": True})
    ready = "True" if sidecar is not None else "False"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {"containers": containers},
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1" if sidecar is not None else None,
            "conditions": [{"type": "Ready", "status": ready}],
            "containerStatuses": statuses,
        },
    }


def post(emulator: EmulatorThread, path: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(emulator.url + path, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    thread = EmulatorThread().start()
    try:
        post(
            thread,
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        )
        yield thread
    finally:
        thread.stop()


def status_env(kubeconfig: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "LLMROUTE_"))}
    env.update(KUBECONFIG=str(kubeconfig), HOME=str(home))
    return env


def run_status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OPERATOR, "status", *args], capture_output=True, text=True, timeout=60, env=env)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 20}


async def chat(session: aiohttp.ClientSession, url: str, tenant: str) -> int:
    async with session.post(f"{url}/v1/chat/completions", json=CHAT, headers={"X-Tenant-ID": tenant}) as r:
        await r.read()
        return r.status


async def held_stream(session: aiohttp.ClientSession, url: str, tenant: str) -> aiohttp.ClientResponse:
    """A chat stream the mock upstream holds after its first event (until ``mock.release()``)."""
    headers = {"X-Tenant-ID": tenant, "X-Mock-Hold": "1"}
    response = await session.post(
        f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    )
    assert response.status == 200
    await response.content.readuntil(b"\n\n")
    return response


def by_name(view: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    return next(item for item in view[kind] if item["name"] == name)


def test_status_shows_what_the_sidecar_admitted_held_and_rejected(
    emulator: EmulatorThread,
    redis_server: RedisServer,
    mock: MockUpstream,
    sidecars: list[SidecarProcess],
    tmp_path: Path,
) -> None:
    document = route_document(mock.url)
    route_file = tmp_path / "route.yaml"
    route_file.write_text(yaml.safe_dump(document))
    sidecar = start(sidecars, route_file, "--redis", redis_server.url)
    post(
        emulator,
        ROUTES,
        {
            **document,
            "status": {
                "observedGeneration": 1,
                "recommendedReplicas": 2,
                "pods": {"matched": 2, "injected": 1, "ready": 1},
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "Reconciled", "message": "1/2 pods ready"},
                    {
                        "type": "Degraded",
                        "status": "True",
                        "reason": "PodsWithoutSidecar",
                        "message": "chat-b",
                    },
                ],
            },
        },
    )
    post(emulator, PODS, pod("chat-a", {"app": "chat"}, sidecar, redis_server.url))
    post(emulator, PODS, pod("chat-b", {"app": "chat"}, None, redis_server.url))
    post(emulator, PODS, pod("other", {"app": "other"}, None, redis_server.url))
    env = status_env(write_kubeconfig(tmp_path / "kubeconfig", emulator.url, NAMESPACE), tmp_path)
    route = parse_route(document)

    def leases_and_inflight() -> tuple[int, int]:
        usage = asyncio.run(read_usage(redis_server.url, route.key, limit_queries(route)))
        _, hints = http_get(f"{sidecar.admin}/hints")
        return usage["global"][0].used["concurrentRequests"], json.loads(hints)["inflight"]

    async def scenario() -> tuple[dict[str, Any], str, dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            held = await held_stream(session, sidecar.url, "acme")
            try:
                codes = [await chat(session, sidecar.url, "acme") for _ in range(4)]
                codes += [await chat(session, sidecar.url, "beta") for _ in range(2)]
                codes.append(await chat(session, sidecar.url, "acme"))  # acme's 6th this minute: over 5
                assert codes == [200] * 6 + [429]
                # The plain requests settle in the background: wait until only the held stream remains.
                await asyncio.to_thread(
                    wait_for, lambda: leases_and_inflight() == (1, 1), 10, 0.05, "plain requests settled"
                )
                # No --redis and no LLMROUTE_REDIS_URL: the URL comes from the injected sidecar's env.
                as_json = await asyncio.to_thread(run_status, env, ROUTE, "--output", "json")
                as_text = await asyncio.to_thread(run_status, env, ROUTE, "-n", NAMESPACE)
            finally:
                mock.release()
                await held.read()
                held.close()
        assert as_json.returncode == 0 and as_text.returncode == 0, as_json.stderr + as_text.stderr

        await asyncio.to_thread(
            wait_for, lambda: leases_and_inflight() == (0, 0), 10, 0.05, "the stream's settlement"
        )
        done = await asyncio.to_thread(
            run_status, env, ROUTE, "--output", "json", "--redis", redis_server.url
        )
        assert done.returncode == 0, done.stderr
        return json.loads(as_json.stdout), as_text.stdout, json.loads(done.stdout)

    held, text, after = asyncio.run(scenario())

    # While the stream is held: 7 admitted fleet-wide, 1 lease, acme at 5 of 5, beta at 2.
    assert held["usage_source"] == f"{redis_server.url} (the sidecars' LLMROUTE_REDIS_URL)"
    assert held["usage_problem"] is None
    assert (held["generation"], held["observed_generation"], held["recommended_replicas"]) == (1, 1, 2)
    assert [(c["type"], c["status"], c["reason"]) for c in held["conditions"]] == [
        ("Ready", "True", "Reconciled"),
        ("Degraded", "True", "PodsWithoutSidecar"),
    ]
    overall = by_name(held, "limits", "global")
    assert overall["configured"] == {
        "requestsPerMinute": 100,
        "tokensPerMinute": 100000,
        "concurrentRequests": 10,
    }
    assert overall["active_subjects"] == 1
    (route_usage,) = overall["top"]
    assert route_usage["subject"] == "_"
    assert route_usage["used"]["requestsPerMinute"] == 7
    assert route_usage["used"]["concurrentRequests"] == 1
    assert route_usage["used"]["tokensPerMinute"] > 0  # six settled requests plus the held reservation
    tenant = by_name(held, "limits", "tenant")
    assert tenant["active_subjects"] == 2
    assert [(s["subject"], s["used"]) for s in tenant["top"]] == [
        (sha256_hex("acme")[:32], {"requestsPerMinute": 5}),
        (sha256_hex("beta")[:32], {"requestsPerMinute": 2}),
    ]
    assert tenant["rejections"] == {"requestsPerMinute": 1} and overall["rejections"] == {}
    (last,) = held["recent_rejections"]  # the sidecar's /rejections: which limit, whom, when
    assert (last["pod"], last["limit"], last["dimension"], last["status"]) == (
        "chat-a",
        "tenant",
        "requestsPerMinute",
        429,
    )
    assert 0 < last["retry_after_seconds"] <= 60 and abs(last["ts"] - time.time()) < 120
    assert "Last rejections:" in text and "tenant/requestsPerMinute" in text
    assert [p["name"] for p in held["pods"]] == ["chat-a", "chat-b"]  # "other" is not selected
    chat_a, chat_b = held["pods"]
    assert (chat_a["ready"], chat_a["injected"], chat_a["sidecar_ready"], chat_a["inflight"]) == (
        True,
        True,
        True,
        1,
    )
    assert (chat_b["ready"], chat_b["injected"], chat_b["sidecar_ready"], chat_b["inflight"]) == (
        False,
        False,
        None,
        None,
    )

    # The same figures for people.
    assert "LLMRoute:     tests/chat" in text
    assert re.search(r"^    requestsPerMinute\s+7 / 100 \(7%\)$", text, re.M), text
    assert re.search(r"^    concurrentRequests\s+1 / 10 \(10%\)$", text, re.M), text
    assert re.search(rf"^    {sha256_hex('acme')[:32]}\s+5 / 5 \(100%\)$", text, re.M), text
    assert re.search(r"^  tenant\s+requestsPerMinute\s+1$", text, re.M), text
    assert "acme" not in text and "beta" not in text  # subjects only as stored hashes

    # Settled: no lease, and the tokens in the window are what the sidecar charged the quota.
    (route_usage,) = by_name(after, "limits", "global")["top"]

    def charged() -> float:  # what the sidecar charged the quota, by its own counters
        return sum(
            sign * sidecar.metric("llmroute_tokens_total", kind=kind)
            for kind, sign in (("reserved", 1), ("refunded", -1), ("overrun", 1))
        )

    assert route_usage["used"]["concurrentRequests"] == 0
    assert route_usage["used"]["requestsPerMinute"] == 7
    assert route_usage["used"]["tokensPerMinute"] > 0
    wait_for(
        lambda: charged() == route_usage["used"]["tokensPerMinute"], 5, what="the sidecar's token counters"
    )
    assert after["usage_source"] == f"{redis_server.url} (--redis)"
    assert by_name(after, "pods", "chat-a")["inflight"] == 0


def test_status_without_reachable_redis_prints_limits_and_says_why(
    emulator: EmulatorThread, tmp_path: Path
) -> None:
    post(emulator, ROUTES, route_document("http://127.0.0.1:9"))
    env = status_env(write_kubeconfig(tmp_path / "kubeconfig", emulator.url, NAMESPACE), tmp_path)
    dead = f"redis://127.0.0.1:{free_port()}/0"

    done = run_status(env, ROUTE, "--redis", dead, "--no-probe")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    (problem,) = [line for line in lines if line.startswith("Usage:        not shown: ")]
    assert dead in problem and "not readable" in problem
    assert any(line.startswith("  global  key=route  requestsPerMinute=100") for line in lines), done.stdout
    assert "Rejections (429s): not probed (--no-probe)" in lines
    assert "none yet (the operator has not reconciled this route)" in done.stdout

    no_url = run_status(env, ROUTE, "--output", "json", "--no-probe")
    assert no_url.returncode == 0
    assert json.loads(no_url.stdout)["usage_problem"].startswith("no Redis URL")


def test_unknown_route_is_one_line_and_exit_1(emulator: EmulatorThread, tmp_path: Path) -> None:
    env = status_env(write_kubeconfig(tmp_path / "kubeconfig", emulator.url, NAMESPACE), tmp_path)

    done = run_status(env, "nope")

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"llmroute-operator: LLMRoute {NAMESPACE}/nope not found\n"


def test_without_kubeconfig_it_says_so_in_one_line(tmp_path: Path) -> None:
    done = run_status(status_env(tmp_path / "missing", tmp_path), ROUTE)

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("llmroute-operator: no Kubernetes credentials")
    assert done.stderr.count("\n") == 1
