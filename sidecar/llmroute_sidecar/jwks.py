"""A JWKS fetched from ``identity.jwt.jwksUrl``: cached, refreshed on an interval and on unknown kids.

One ``JwksCache`` per URL holds the last key set that parsed. Fetches are single-flight (concurrent
callers share one), and a failed or empty fetch keeps the previous keys. Refreshes asked for by
tokens with an unknown ``kid`` happen at most once per ``jwksMinRefreshSeconds``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from llmroute_sidecar.jwt_identity import KeySet, parse_jwks

log = logging.getLogger("llmroute.jwks")
#: Largest JWKS document accepted.
MAX_JWKS_BYTES = 1024 * 1024
FETCH_TIMEOUT_SECONDS = 5.0
#: While no key set was ever loaded, attempts are paced by this instead of jwksMinRefreshSeconds.
FIRST_LOAD_RETRY_SECONDS = 1.0


class JwksFetchError(Exception):
    """The JWKS URL did not give a usable key set (the message says why, without the body)."""


class JwksCache:
    """The key set of one JWKS URL."""

    def __init__(
        self,
        url: str,
        session: Callable[[], aiohttp.ClientSession],
        refresh_seconds: float,
        min_refresh_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._session = session
        self.refresh_seconds = refresh_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self._clock = clock
        self.keys: KeySet | None = None
        self.loaded_at: float | None = None
        """When the current keys were fetched (monotonic)."""
        self.attempted_at: float | None = None
        self.fetches = 0
        """Fetch attempts so far (successful or not)."""
        self._inflight: asyncio.Task[bool] | None = None

    def due(self) -> bool:
        """True when the interval refresh (or the first load) should run now."""
        now = self._clock()
        if self.keys is None:
            return self.attempted_at is None or now - self.attempted_at >= FIRST_LOAD_RETRY_SECONDS
        return self.loaded_at is None or now - self.loaded_at >= self.refresh_seconds

    def may_refresh_early(self) -> bool:
        """Whether a token with an unknown kid may trigger a fetch now (the refresh rate limit)."""
        if self._inflight is not None:
            return True  # joining a fetch already under way costs nothing
        if self.attempted_at is None:
            return True
        pace = FIRST_LOAD_RETRY_SECONDS if self.keys is None else self.min_refresh_seconds
        return self._clock() - self.attempted_at >= pace

    async def refresh(self, reason: str) -> bool:
        """Fetch the key set (or join the fetch under way); True when the keys are fresh now."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch(reason), name="jwks-fetch")
            self._inflight.add_done_callback(self._fetched)
        return await asyncio.shield(self._inflight)

    def _fetched(self, task: asyncio.Task[bool]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # _fetch handles its errors; this only marks the result retrieved

    async def _fetch(self, reason: str) -> bool:
        self.attempted_at = self._clock()
        self.fetches += 1
        try:
            keys = await self._download()
        except JwksFetchError as error:
            log.warning(
                "jwks fetch failed; keeping the previous keys" if self.keys else "jwks fetch failed",
                extra={"fields": {"url": self.url, "reason": reason, "error": str(error)}},
            )
            return False
        changed = self.keys is None or self.keys.kids != keys.kids
        self.keys, self.loaded_at = keys, self._clock()
        (log.info if changed else log.debug)(
            "jwks loaded", extra={"fields": {"url": self.url, "reason": reason, "kids": keys.kids}}
        )
        return True

    async def _download(self) -> KeySet:
        try:
            async with (
                asyncio.timeout(FETCH_TIMEOUT_SECONDS),
                self._session().get(self.url, headers={"Accept": "application/json"}) as response,
            ):
                if response.status != 200:
                    raise JwksFetchError(f"answered {response.status}")
                body = await response.content.read(MAX_JWKS_BYTES + 1)
        except TimeoutError:
            raise JwksFetchError(f"no answer within {FETCH_TIMEOUT_SECONDS:g}s") from None
        except aiohttp.ClientError as error:
            raise JwksFetchError(f"unreachable: {type(error).__name__}") from None
        if len(body) > MAX_JWKS_BYTES:
            raise JwksFetchError(f"larger than {MAX_JWKS_BYTES} bytes")
        try:
            return parse_jwks(body)
        except ValueError as error:
            raise JwksFetchError(str(error)) from None

    async def close(self) -> None:
        task = self._inflight
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
