"""``litellm`` as a client library (``openai/<model>`` with ``api_base`` = the sidecar) gets what it gets
from the upstream directly: same text, streamed or not, same embeddings, the same exception types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.interop.stack import CLIENT_KEY, Stack, require_module, start_stack, upstream_of
from tests.support.redis_procs import RedisServer
from tests.support.sidecar_procs import SidecarProcess

require_module("litellm", "pip install -e '.[test]' (litellm[proxy]==1.108.7)")

# litellm's own pydantic models warn at import; not this suite's concern.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Item .* is using the `ReadOnly` qualifier:UserWarning"),
    pytest.mark.filterwarnings(
        "ignore:Accessing the 'model_.*' attribute on the instance:DeprecationWarning"
    ),
]

PROMPT = [{"role": "user", "content": "Say something about drop-in proxies."}]


@pytest.fixture(scope="module")
def litellm() -> Any:
    """The litellm module, imported once (slow) and kept offline (conftest sets its environment)."""
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


def call(litellm: Any, base: str, key: str, stack: Stack, **extra: Any) -> Any:
    return litellm.completion(
        model=f"openai/{stack.upstream.chat_model}",
        api_base=base,
        api_key=key,
        messages=PROMPT,
        num_retries=0,
        timeout=20,
        **extra,
    )


def test_completion_matches_the_upstream(litellm: Any, stack: Stack) -> None:
    through = call(litellm, stack.sidecar_base, CLIENT_KEY, stack)
    direct = call(litellm, stack.direct_base, stack.upstream.api_key, stack)
    assert through.choices[0].message.content == direct.choices[0].message.content
    assert through.choices[0].message.content
    assert through.usage.total_tokens == direct.usage.total_tokens > 0


def test_streamed_completion_matches_the_upstream(litellm: Any, stack: Stack) -> None:
    def text(base: str, key: str) -> str:
        chunks = list(call(litellm, base, key, stack, stream=True))
        assert chunks
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    through = text(stack.sidecar_base, CLIENT_KEY)
    assert through and through == text(stack.direct_base, stack.upstream.api_key)


async def test_async_completion_matches_the_upstream(litellm: Any, stack: Stack) -> None:
    options = {"messages": PROMPT, "num_retries": 0, "timeout": 20}
    model = f"openai/{stack.upstream.chat_model}"
    through = await litellm.acompletion(
        model=model, api_base=stack.sidecar_base, api_key=CLIENT_KEY, **options
    )
    direct = await litellm.acompletion(
        model=model, api_base=stack.direct_base, api_key=stack.upstream.api_key, **options
    )
    assert through.choices[0].message.content == direct.choices[0].message.content


def test_embedding_matches_the_upstream(litellm: Any, stack: Stack) -> None:
    def vectors(base: str, key: str) -> list[list[float]]:
        response = litellm.embedding(
            model=f"openai/{stack.upstream.embed_model}", api_base=base, api_key=key, input=["one", "two"]
        )
        return [item["embedding"] for item in response.data]

    through = vectors(stack.sidecar_base, CLIENT_KEY)
    assert through and through == vectors(stack.direct_base, stack.upstream.api_key)


def test_unknown_key_raises_litellm_authentication_error(litellm: Any, stack: Stack) -> None:
    with pytest.raises(litellm.AuthenticationError) as caught:
        call(litellm, stack.sidecar_base, "sk-not-a-known-key", stack)
    assert caught.value.status_code == 401


def test_rate_limit_raises_litellm_rate_limit_error(
    litellm: Any,
    request: pytest.FixtureRequest,
    interop_redis: RedisServer,
    interop_secrets: Path,
    tmp_path: Path,
    sidecars: list[SidecarProcess],
) -> None:
    upstream = upstream_of("litellm", request)
    limits = [{"name": "one", "requestsPerMinute": 1}]
    limited, sidecar = start_stack(upstream, interop_redis, interop_secrets, tmp_path, limits=limits)
    sidecars.append(sidecar)
    call(litellm, limited.sidecar_base, CLIENT_KEY, limited)
    with pytest.raises(litellm.RateLimitError) as caught:
        call(litellm, limited.sidecar_base, CLIENT_KEY, limited)
    assert caught.value.status_code == 429
