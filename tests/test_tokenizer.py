"""``spec.tokens.promptCounting: tiktoken``: exact prompt counts for the models tiktoken knows.

The encodings come from the copies the ``litellm`` test dependency bundles (TIKTOKEN_CACHE_DIR),
so nothing is downloaded; the sidecar tests run a real sidecar against the mock upstream.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llmroute_sidecar.openai.requests import parse_request
from llmroute_sidecar.openai.tokenizer import RETRY_SECONDS, PromptTokenizer, prompt_tokens
from llmroute_sidecar.openai.tokens import estimate_prompt_tokens
from tests.support.clock import FakeClock
from tests.support.sidecar_procs import MockUpstream, SidecarProcess, start, wait_for
from tests.test_sidecar_proxy import CHAT, write_route

tiktoken = pytest.importorskip("tiktoken")


def bundled_encodings() -> Path:
    """litellm's bundled tiktoken cache (o200k_base, cl100k_base, p50k_base), found without importing
    litellm (its import reaches for the network)."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("litellm (a test dependency) bundles the tiktoken encodings these tests use")
    directory = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    assert (directory / "fb374d419588a4632f3f557e76b4b70aebbca790").is_file(), "o200k_base is not bundled"
    return directory


@pytest.fixture
def encodings(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = bundled_encodings()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(directory))
    yield directory


def chat(content: Any, model: str = "gpt-4o", **message: Any) -> bytes:
    messages = [{"role": "user", "content": content, **message}]
    return json.dumps({"model": model, "messages": messages}).encode()


def loaded_tokenizer() -> PromptTokenizer:
    tokenizer = PromptTokenizer()
    tokenizer.preload(("o200k_base",))
    wait_for(lambda: tokenizer.loaded("o200k_base"), 30)
    return tokenizer


def test_chat_prompts_follow_openais_accounting(encodings: Path) -> None:
    tokenizer = loaded_tokenizer()
    # "Say this is a test" is 5 tokens; + role "user" (1) + 3 per message + 3 priming = 12.
    counted = tokenizer.count(parse_request(CHAT, chat("Say this is a test")))
    assert counted.prompt_tokens == 12
    assert estimate_prompt_tokens(counted) == 12  # what admission and relay use from now on
    named = tokenizer.count(parse_request(CHAT, chat("Say this is a test", name="bob")))
    assert named.prompt_tokens == 12 + 1 + 1  # "bob" is one token, plus 1 per name
    parts = [{"type": "text", "text": "Say this"}, {"type": "text", "text": " is a test"}]
    assert tokenizer.count(parse_request(CHAT, chat(parts))).prompt_tokens == 12


def test_other_request_kinds_count_their_text_and_token_ids(encodings: Path) -> None:
    tokenizer = loaded_tokenizer()
    enc = tiktoken.get_encoding("o200k_base")
    text = "The quick brown fox jumps over the lazy dog. 12345 + 67890 = 80235"
    embeddings = parse_request(
        "/v1/embeddings", json.dumps({"model": "text-embedding-3-small", "input": [text, text]}).encode()
    )
    # text-embedding-3-small is cl100k_base: not loaded yet, so the estimate stays until it is.
    assert tokenizer.count(embeddings).prompt_tokens is None
    wait_for(lambda: tokenizer.loaded("cl100k_base"), 30)
    cl100k = tiktoken.get_encoding("cl100k_base")
    assert tokenizer.count(embeddings).prompt_tokens == 2 * len(cl100k.encode_ordinary(text))
    ids = parse_request("/v1/completions", json.dumps({"model": "gpt-4o", "prompt": [[1, 2, 3]]}).encode())
    assert tokenizer.count(ids).prompt_tokens == 3  # token ids count one each
    responses = parse_request(
        "/v1/responses", json.dumps({"model": "gpt-4.1", "instructions": "Be brief.", "input": text}).encode()
    )
    expected = len(enc.encode_ordinary("Be brief.")) + len(enc.encode_ordinary(text))
    assert prompt_tokens(enc, responses) == expected


def test_unknown_models_keep_the_estimate(encodings: Path) -> None:
    tokenizer = loaded_tokenizer()
    parsed = parse_request(CHAT, chat("hello there", model="llama-3-70b"))
    assert tokenizer.count(parsed) is parsed
    assert estimate_prompt_tokens(parsed) == 3 + 4 + 3  # ceil(11 / 4) + 4 per message + 3


def test_a_failed_load_keeps_the_estimate_and_retries_later(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    calls: list[str] = []

    def broken(name: str) -> Any:
        calls.append(name)
        raise OSError("no route to openaipublic.blob.core.windows.net")

    tokenizer = PromptTokenizer(load=broken, model_encoding=lambda model: "o200k_base", clock=clock)
    parsed = parse_request(CHAT, chat("hello"))
    assert tokenizer.count(parsed) is parsed
    wait_for(lambda: "tokenizer encoding unavailable" in caplog.text, 10)
    assert tokenizer.count(parsed) is parsed  # within RETRY_SECONDS: no second attempt
    assert calls == ["o200k_base"]
    clock.advance(RETRY_SECONDS + 1)
    tokenizer.count(parsed)
    wait_for(lambda: len(calls) == 2, 10)


# -- a real sidecar: the exact count decides admission ------------------------------------------

CJK = "鬱蔚" * 200  # 400 rare CJK characters: the estimate says 100 tokens, o200k_base 800


async def post(sidecar: SidecarProcess, body: bytes) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        headers = {"Content-Type": "application/json"}
        async with session.post(f"{sidecar.url}{CHAT}", data=body, headers=headers) as response:
            return response.status, await response.json()


@pytest.mark.parametrize("counting", ["estimate", "tiktoken"])
async def test_tokens_per_minute_admits_by_the_exact_count(
    tmp_path: Path, mock: MockUpstream, sidecars: list[SidecarProcess], encodings: Path, counting: str
) -> None:
    exact = 3 + 3 + 1 + len(tiktoken.get_encoding("o200k_base").encode_ordinary(CJK))
    assert exact > 250 > 3 + 4 + 100 + 1 + 16  # the limit sits between the estimate and the truth
    route = write_route(
        tmp_path / "r.yaml",
        mock.url,
        tokens={"promptCounting": counting},
        limits=[{"name": "tpm", "tokensPerMinute": 250}],
    )
    sidecar = start(sidecars, route, env={"TIKTOKEN_CACHE_DIR": str(encodings)})
    if counting == "tiktoken":
        sidecar.wait_record(lambda r: r.get("msg") == "tokenizer encoding loaded", 30)
    status, body = await post(sidecar, _bounded(CJK))
    if counting == "estimate":
        assert status == 200, body
    else:
        assert status == 400, body
        assert body["error"]["code"] == "request_too_large_for_limit"
        assert f"it reserves {exact + 1} tokens" in body["error"]["message"]
    # A model tiktoken does not know keeps the estimate, whatever the route says.
    status, body = await post(sidecar, _bounded(CJK, model="llama-3-70b"))
    assert status == 200, body


def _bounded(content: str, model: str = "gpt-4o") -> bytes:
    return json.dumps(
        {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": content}]}
    ).encode()
