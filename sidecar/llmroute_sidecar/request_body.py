"""Request bodies: ``Content-Encoding`` decoded with a bound on the decoded size, streamed or buffered.

The sidecar decodes ``gzip``/``x-gzip``/``deflate`` bodies itself (aiohttp's own decompression is off)
and forwards them plain, without ``Content-Encoding``: ``maxRequestBytes`` applies to the decoded
size, so a zip bomb is a 413, and an unknown coding is a 415 ``unsupported_encoding``.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

from aiohttp import web

from llmroute_sidecar import errors
from llmroute_sidecar.errors import ProxyError

CHUNK = 64 * 1024
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def too_large(limit: int) -> ProxyError:
    return errors.bad_request("request_too_large", f"request body exceeds {limit} bytes", status=413)


def codings(request: web.Request) -> list[str]:
    """The body's content codings, outermost last; 415 for one the sidecar cannot decode."""
    found = [
        token.strip().lower()
        for value in request.headers.getall("Content-Encoding", [])
        for token in value.split(",")
        if token.strip() and token.strip().lower() != "identity"
    ]
    for coding in found:
        if coding not in _WBITS:
            raise errors.bad_request(
                "unsupported_encoding",
                f"Content-Encoding {coding!r} is not supported (use gzip, deflate or identity)",
                status=415,
            )
    return found


class _Decoder:
    """One coding, decoded incrementally with a bound on the output."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._raw_fallback = coding == "deflate"  # some clients send raw deflate without the zlib header
        self._obj = zlib.decompressobj(_WBITS[coding])

    def feed(self, data: bytes, budget: int) -> bytes:
        """Decoded bytes of ``data``; raises 413 past ``budget`` decoded bytes."""
        out = bytearray()
        while data:
            try:
                piece = self._obj.decompress(data, budget - len(out) + 1)
            except zlib.error:
                if self._raw_fallback:
                    self._raw_fallback = False
                    self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise errors.bad_request(
                    "invalid_encoding", f"the request body is not valid {self.coding}"
                ) from None
            self._raw_fallback = False
            out += piece
            if len(out) > budget:
                raise OverflowError
            if self._obj.eof and self._obj.unused_data and self.coding != "deflate":
                data = self._obj.unused_data  # a further gzip member
                self._obj = zlib.decompressobj(_WBITS[self.coding])
            else:
                data = self._obj.unconsumed_tail
        return bytes(out)

    def finish(self) -> None:
        if not self._obj.eof:
            raise errors.bad_request("invalid_encoding", f"the request body is a truncated {self.coding}")


class BodyReader:
    """A request's body, decoded and bounded; ``error`` keeps a failure a streamed upload hit."""

    def __init__(self, request: web.Request, limit: int) -> None:
        self.limit = limit
        self.decoders = [_Decoder(coding) for coding in reversed(codings(request))]
        self.error: ProxyError | None = None
        self._request = request

    @property
    def decoded(self) -> bool:
        return bool(self.decoders)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Decoded chunks; 413 once more than ``limit`` decoded bytes arrived."""
        size = 0
        try:
            async for chunk in self._request.content.iter_chunked(CHUNK):
                for decoder in self.decoders:
                    try:
                        chunk = decoder.feed(chunk, self.limit - size)
                    except OverflowError:
                        raise too_large(self.limit) from None
                size += len(chunk)
                if size > self.limit:
                    raise too_large(self.limit)
                if chunk:
                    yield chunk
            for decoder in self.decoders:
                decoder.finish()
        except ProxyError as error:
            self.error = error
            raise

    async def read(self) -> bytes:
        """The whole decoded body."""
        if not self.decoders:
            length = self._request.content_length
            if length is not None and length > self.limit:
                raise too_large(self.limit)
            if length is not None:  # the parser delivers exactly ``length`` bytes: one read
                return await self._request.content.read()
        return b"".join([chunk async for chunk in self.chunks()])
