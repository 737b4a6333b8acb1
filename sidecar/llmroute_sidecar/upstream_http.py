"""HTTP/1.1 on the wire for ``upstream_client``, the pure part: the request bytes, the response head,
its body framing (RFC 9112 section 6.3) and an incremental chunked decoder. No I/O here.

Written for the hot path: string methods and tuples, no per-header objects beyond the multidict.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

#: A response head (status line and headers) may not be larger.
MAX_HEAD = 64 * 1024
#: A chunk-size or trailer line may not be larger.
MAX_LINE = 8 * 1024
#: Body framings besides a Content-Length (>= 0).
CHUNKED = -1
UNTIL_CLOSE = -2
DEFAULT_TYPE = "application/octet-stream"

#: Three-digit status codes by their text: validation and ``int`` in one lookup.
_STATUS = {str(code): code for code in range(100, 1000)}
_HEX = b"0123456789abcdefABCDEF"
_NO_BODY_STATUS = frozenset({204, 304})
_LENGTH_METHODS = frozenset({"POST", "PUT", "PATCH"})
_WS = (" ", "\t")

Head = tuple[int, str, CIMultiDictProxy[str], str, int | None, int, bool]
"""status, reason, headers, content type, Content-Length (or None), framing (a length, CHUNKED or
UNTIL_CLOSE), keep-alive."""


class ProtocolError(ValueError):
    """The upstream's response is not valid HTTP/1.x."""


class InvalidRequestError(ValueError):
    """The request cannot be written safely (a CR or LF in a header, a bad method or target)."""


def encode_request(
    method: str, target: str, host: str, headers: CIMultiDict[str], body: bytes | None
) -> bytes:
    """The request line, headers and body as one ``bytes``.

    ``Host`` is added unless ``headers`` has one; ``Content-Length`` always describes ``body`` (0 for
    POST, PUT and PATCH without one); the caller's own framing headers are dropped. Every other header
    is kept, in order. A CR or LF anywhere in the head, or a space in the method or target, raises
    ``InvalidRequestError`` (never a second request smuggled into the first).
    """
    if "Content-Length" in headers or "Transfer-Encoding" in headers:
        framing = ("content-length", "transfer-encoding")
        headers = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in framing)
    lines = [f"{k}: {v}\r\n" for k, v in headers.items()]
    if "Host" not in headers:
        lines.append(f"Host: {host}\r\n")
    if body:
        lines.append(f"Content-Length: {len(body)}\r\n")
    elif method in _LENGTH_METHODS:
        lines.append("Content-Length: 0\r\n")
    text = f"{method} {target} HTTP/1.1\r\n{''.join(lines)}\r\n"
    expected = len(lines) + 2
    if text.count("\n") != expected or text.count("\r") != expected or " " in method or " " in target:
        raise InvalidRequestError("a CR or LF in a request header, or a space in the method or target")
    head = text.encode("utf-8", "surrogateescape")
    return head + body if body else head


def parse_head(data: bytes, head_request: bool) -> Head:
    """A response head (without its final blank line) and how its body is framed.

    Raises ``ProtocolError`` for anything RFC 9112 rejects: an unknown version, a bad status code, a
    header line without a colon or with whitespace in its name, obs-fold (a line starting with
    whitespace), an invalid or conflicting Content-Length.
    """
    lines = data.decode("utf-8", "surrogateescape").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version == "HTTP/1.1":
        keep_alive = True
    elif version == "HTTP/1.0":
        keep_alive = False
    else:
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    try:
        status = _STATUS[code]
    except KeyError:
        raise ProtocolError(f"bad status code: {lines[0][:80]!r}") from None
    pairs = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or " " in name or "\t" in name:
            raise ProtocolError(f"bad header line: {line[:80]!r}")
        if value[:1] == " " and value[1:2] not in _WS and value[-1:] not in _WS:
            value = value[1:]  # the usual "Name: value": no call to strip
        else:
            value = value.strip(" \t")
        pairs.append((name, value))
    headers = CIMultiDict(pairs)
    if "Connection" in headers:
        tokens = {t.strip().lower() for v in headers.getall("Connection") for t in v.split(",")}
        keep_alive = "close" not in tokens and (keep_alive or "keep-alive" in tokens)
    length: int | None = None
    if "Content-Length" in headers:
        length = _content_length(headers.getall("Content-Length"))
    if head_request or status < 200 or status in _NO_BODY_STATUS:
        framing = 0
    elif "Transfer-Encoding" in headers:
        codings = ",".join(headers.getall("Transfer-Encoding")).rsplit(",", 1)[-1]
        framing = CHUNKED if codings.strip(" \t").lower() == "chunked" else UNTIL_CLOSE
        if length is not None or framing == UNTIL_CLOSE:
            keep_alive = False  # both framings: a smuggling attempt, never reuse the connection
    elif length is not None:
        framing = length
    else:
        framing, keep_alive = UNTIL_CLOSE, False
    content_type = headers.get("Content-Type")
    if not content_type:
        content_type = DEFAULT_TYPE
    elif ";" in content_type:
        content_type = content_type.partition(";")[0].strip().lower()
    else:
        content_type = content_type.lower()
    return status, reason, CIMultiDictProxy(headers), content_type, length, framing, keep_alive


def _content_length(values: list[str]) -> int:
    value, *more = values
    if more or "," in value:  # "5, 5" (a list of one repeated value) is allowed, "5, 6" is not
        found = {v.strip(" \t") for item in values for v in item.split(",")}
        if len(found) != 1:
            raise ProtocolError(f"conflicting Content-Length values: {values!r}")
        value = found.pop()
    if not (value.isdigit() and value.isascii()):
        raise ProtocolError(f"invalid Content-Length: {value[:40]!r}")
    return int(value)


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
#: Chunk-size lines seen (plain hex, no extension) and their value: a stream's sizes repeat.
_SIZES: dict[bytes, int] = {}


def _chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (hex, extensions ignored); remembered when the line is plain."""
    size = line.partition(b";")[0].strip(b" \t")
    if not size or len(size) > 16 or size.translate(None, _HEX):
        raise ProtocolError(f"bad chunk size: {line[:40]!r}")
    value = int(size, 16)
    if size == line and len(_SIZES) < 4096:
        _SIZES[line] = value
    return value


class ChunkedDecoder:
    """Decodes a chunked body as it arrives: extensions ignored, trailers read and dropped.

    ``feed`` appends the body bytes to a list; ``done`` once the last chunk and trailers are in;
    ``extra`` counts bytes that came after them (the connection cannot be reused then).
    """

    __slots__ = ("_pending", "_remaining", "_state", "done", "extra")

    def __init__(self) -> None:
        self._pending = b""
        self._remaining = 0
        self._state = _SIZE
        self.done = False
        self.extra = 0

    def feed(self, data: bytes, out: list[bytes]) -> int:
        """Decode ``data``, appending body bytes to ``out``; how many were appended. Raises
        ``ProtocolError`` on a malformed chunk."""
        if self._pending:
            data = self._pending + data
            self._pending = b""
        end = len(data)
        pos = added = 0
        state = self._state
        while pos < end:
            if state == _DATA:
                remaining = self._remaining
                stop = pos + remaining
                if stop >= end:
                    out.append(data[pos:] if pos else data)
                    added += end - pos
                    self._remaining = stop - end
                    if stop == end:
                        state = _DATA_END
                    break
                out.append(data[pos:stop])
                added += remaining
                pos = stop
                state = _DATA_END
            elif state == _DATA_END:
                crlf = data[pos : pos + 2]
                if crlf == b"\r\n":
                    pos += 2
                    state = _SIZE
                elif crlf == b"\r":  # the last byte so far
                    self._pending = crlf
                    break
                else:
                    raise ProtocolError("chunk data longer than its size")
            elif state == _DONE:
                self.extra += end - pos
                break
            else:
                newline = data.find(b"\r\n", pos)
                if newline < 0:
                    if end - pos > MAX_LINE:
                        raise ProtocolError("chunk-size or trailer line too long")
                    self._pending = data[pos:]
                    break
                line = data[pos:newline]
                pos = newline + 2
                if state == _SIZE:
                    try:
                        size = _SIZES[line]
                    except KeyError:
                        size = _chunk_size(line)
                    stop = pos + size
                    if size and data[stop : stop + 2] == b"\r\n":  # the whole chunk is in: one step
                        out.append(data[pos:stop])
                        added += size
                        pos = stop + 2
                        continue
                    self._remaining = size
                    state = _DATA if size else _TRAILER
                elif not line:  # _TRAILER: the blank line ends the body
                    state = _DONE
                    self.done = True
        self._state = state
        return added
