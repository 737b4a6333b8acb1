"""Processes of the interop suite: the LiteLLM proxy as a real third-party upstream, and route files.

The LiteLLM proxy runs from its own CLI (``litellm --config FILE --port N``) with ``mock_response``
models, offline: it must never fetch its model cost map or send telemetry. A package or a proxy that
is not available makes the tests skip with the reason (``LLMROUTE_REQUIRE_INTEROP=1`` turns that into
a failure, for CI runs that must prove the drop-in claim).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from tests.support.redis_procs import RedisServer
from tests.support.sidecar_procs import ManagedProcess, MockUpstream, SidecarProcess, free_port, http_get

#: The LiteLLM proxy's master key: the "vendor key" the sidecar sends upstream in the client's place.
LITELLM_MASTER_KEY = "sk-litellm-master"
#: A client key the sidecar routes know (identity.keysSecretRef); any other key is answered 401.
CLIENT_KEY = "sk-interop-client"
CHAT_MODEL = "mock-chat"
EMBED_MODEL = "mock-embed"
#: What the LiteLLM mock chat model answers; streamed in 3-character chunks.
MOCK_REPLY = "Hello from the LiteLLM mock upstream: a drop-in sidecar changes none of these bytes."
STARTUP_SECONDS = 90.0

#: Keeps LiteLLM (proxy and client library) offline and quiet.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",
    "DISABLE_SCHEMA_UPDATE": "True",
    "NO_DOCS": "True",
    "NO_REDOC": "True",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def unavailable(reason: str) -> NoReturn:
    """Skip with ``reason``; fail instead when ``LLMROUTE_REQUIRE_INTEROP=1``."""
    if os.environ.get("LLMROUTE_REQUIRE_INTEROP") == "1":
        pytest.fail(f"interop requirement missing (LLMROUTE_REQUIRE_INTEROP=1): {reason}")
    pytest.skip(reason)


def require_module(name: str, install: str) -> None:
    """Skip (see ``unavailable``) when ``name`` cannot be imported."""
    if importlib.util.find_spec(name) is None:
        unavailable(f"{name} is not installed: {install}")


def litellm_config(path: Path) -> Path:
    """A LiteLLM proxy config with a streaming-capable mock chat model and a mock embedding model."""
    config = {
        "model_list": [
            {
                "model_name": CHAT_MODEL,
                "litellm_params": {
                    "model": "openai/mock-chat",
                    "api_key": "sk-unused",
                    "mock_response": MOCK_REPLY,
                },
            },
            {
                "model_name": EMBED_MODEL,
                "litellm_params": {
                    "model": "openai/text-embedding-3-small",
                    "api_key": "sk-unused",
                    "mock_response": [0.25, 0.5, 0.75],
                },
            },
        ],
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }
    path.write_text(yaml.safe_dump(config))
    return path


class LiteLLMProxy(ManagedProcess):
    """``litellm --config FILE --host 127.0.0.1 --port N``, waited for on /health/liveliness."""

    def __init__(self, workdir: Path) -> None:
        binary = Path(sys.executable).parent / "litellm"
        if not binary.exists():
            unavailable(f"the LiteLLM proxy CLI is not installed ({binary}): pip install -e '.[test]'")
        self.port = free_port()
        config = litellm_config(workdir / "litellm.yaml")
        argv = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(argv, env=LITELLM_ENV, cwd=workdir)
        deadline = time.monotonic() + STARTUP_SECONDS
        while http_get(f"{self.url}/health/liveliness", timeout=2)[0] != 200:
            if not self.alive or time.monotonic() > deadline:
                state = (
                    f"exited {self.proc.returncode}" if not self.alive else f"not up in {STARTUP_SECONDS}s"
                )
                tail = self.output()[-3000:]
                self.stop()
                unavailable(f"the LiteLLM proxy did not start ({state}):\n{tail}")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Upstream:
    """One upstream of the suite, as a client talking to it directly would use it."""

    kind: str
    """'litellm' (the LiteLLM proxy) or 'mock' (llmroute's own mock upstream)."""
    url: str
    api_key: str
    """The key a direct client uses (the LiteLLM master key; anything for the mock)."""
    chat_model: str
    embed_model: str


@dataclass(frozen=True)
class Stack:
    """A sidecar (Redis store) in front of an upstream."""

    upstream: Upstream
    sidecar: SidecarProcess

    @property
    def direct_base(self) -> str:
        return f"{self.upstream.url}/v1"

    @property
    def sidecar_base(self) -> str:
        return f"{self.sidecar.url}/v1"


def upstream_of(kind: str, request: pytest.FixtureRequest) -> Upstream:
    """The upstream named ``kind``, started on first use."""
    if kind == "litellm":
        proxy: LiteLLMProxy = request.getfixturevalue("litellm_proxy")
        return Upstream("litellm", proxy.url, LITELLM_MASTER_KEY, CHAT_MODEL, EMBED_MODEL)
    mock: MockUpstream = request.getfixturevalue("interop_mock")
    return Upstream("mock", mock.url, "sk-anything", "mock-model", "mock-embedding")


def start_stack(
    upstream: Upstream, redis: RedisServer, secrets: Path, workdir: Path, **spec: object
) -> tuple[Stack, SidecarProcess]:
    """A Redis-backed sidecar in front of ``upstream`` (the caller stops the process)."""
    route = write_route(workdir / "route.yaml", upstream.url, **spec)
    sidecar = SidecarProcess(route, "--redis", redis.url, "--secrets-dir", str(secrets))
    return Stack(upstream, sidecar), sidecar


def write_secrets(directory: Path, client_keys: tuple[str, ...] = (CLIENT_KEY,)) -> Path:
    """Mounted Secrets: ``vendor/api-key`` (the upstream key) and ``client-keys/<sha256(key)>``."""
    (directory / "vendor").mkdir(parents=True, exist_ok=True)
    (directory / "vendor" / "api-key").write_text(LITELLM_MASTER_KEY + "\n")
    keys = directory / "client-keys"
    keys.mkdir(exist_ok=True)
    for key in client_keys:
        (keys / hashlib.sha256(key.encode()).hexdigest()).write_text("")
    return directory


def write_route(path: Path, upstream_url: str, **spec: Any) -> Path:
    """An LLMRoute manifest with a unique name (its own Redis keys), client keys and the vendor key."""
    base: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "interop"}},
        "upstream": {
            "url": upstream_url,
            "timeoutSeconds": 20,
            "retries": 1,
            "apiKeySecretRef": {"name": "vendor", "key": "api-key"},
        },
        "deadlineSeconds": 30,
        "queueTimeoutSeconds": 0,
        "identity": {"keysSecretRef": {"name": "client-keys"}},
        "limits": [{"name": "fleet", "requestsPerMinute": 100_000, "tokensPerMinute": 100_000_000}],
    }
    base.update(spec)
    manifest = {
        "apiVersion": "llmroute.dev/v1alpha1",
        "kind": "LLMRoute",
        "metadata": {"name": f"interop-{uuid.uuid4().hex[:8]}", "namespace": "interop"},
        "spec": base,
    }
    path.write_text(yaml.safe_dump(manifest))
    return path


def access_record(sidecar: SidecarProcess, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The sidecar's access-log record of one request (written after the response ends)."""
    return sidecar.wait_record(
        lambda r: r.get("msg") == "access" and r.get("request_id") == request_id, timeout
    )


def sse_data(body: bytes) -> list[Any]:
    """The JSON documents (and the '[DONE]' marker) of an SSE body, in order."""
    found: list[Any] = []
    for block in body.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data:"):
                data = line[5:].strip()
                found.append(data if data == "[DONE]" else json.loads(data))
    return found
