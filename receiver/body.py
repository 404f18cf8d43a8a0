"""Reading a request body as it streams in: decompression, and limits on the inflated bytes.

Limits apply to the decompressed body, and inflation is bounded at every step
(``max_length``), so a small gzip bomb is refused without the process ever holding the
inflated body. Past a limit the reader keeps counting (and discarding) what still arrives, so
the handler can read the rest of the body and answer 413 instead of resetting the connection.
"""

from __future__ import annotations

import zlib

from pipeline.messages import Problem

SUPPORTED_ENCODINGS = ("identity", "gzip", "x-gzip", "deflate")

TOO_LARGE = Problem("payload_too_large", "Error reading request body", "HTTP request too large", status=413)


class BodyError(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def encoding_problem(content_encoding: str | None) -> Problem | None:
    """None if we can read this Content-Encoding, else the 415 to answer."""
    name = (content_encoding or "identity").strip().lower()
    if name in SUPPORTED_ENCODINGS:
        return None
    return Problem("unsupported_encoding", "Unsupported Content-Encoding",
                   f"{content_encoding!r} is not one of gzip, deflate, identity"[:200], status=415,
                   error="Unsupported Media Type")


class BodyReader:
    """Feed raw chunks; ``finish()`` returns the decompressed body or raises :class:`BodyError`."""

    def __init__(self, content_encoding: str | None, limit: int) -> None:
        name = (content_encoding or "identity").strip().lower()
        self._gzip = name in ("gzip", "x-gzip")
        self._deflate = name == "deflate"
        self._inflater: zlib._Decompress | None = zlib.decompressobj(31) if self._gzip else None
        self._limit = limit
        self._chunks: list[bytes] = []
        self._deflate_head = b""  # deflate's first byte, until a second tells zlib from raw
        self._size = 0
        self.received = 0
        self.too_large = False
        self._error: Problem | None = None

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.too_large or self._error is not None:
            return  # discarding: we only count what is still arriving
        if self._deflate and self._inflater is None:
            chunk, self._deflate_head = self._deflate_head + chunk, b""
            if len(chunk) < 2:
                self._deflate_head = chunk
                return
            self._inflater = zlib.decompressobj(_deflate_wbits(chunk))
        try:
            self._inflate(chunk) if self._inflater is not None else self._keep(chunk)
        except zlib.error as exc:
            self._fail(Problem("invalid_encoding", "Error reading request body",
                               f"the body is not valid {'gzip' if self._gzip else 'deflate'} ({exc})"))

    def _inflate(self, data: bytes) -> None:
        while data and not self.too_large:
            assert self._inflater is not None
            # Never inflate more than one byte past the limit in one step.
            out = self._inflater.decompress(data, self._limit - self._size + 1)
            self._keep(out)
            data = self._inflater.unconsumed_tail
            if self._inflater.eof:
                # Concatenated gzip members are one body (RFC 1952 allows them).
                rest = self._inflater.unused_data
                if rest and self._gzip:
                    self._inflater = zlib.decompressobj(31)
                    data = rest
                elif rest.strip():
                    raise zlib.error("data after the end of the compressed stream")

    def _keep(self, data: bytes) -> None:
        if not data:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.too_large = True
            self._chunks.clear()
            return
        self._chunks.append(data)

    def _fail(self, problem: Problem) -> None:
        self._error = problem
        self._chunks.clear()

    def finish(self) -> bytes:
        if self.too_large:
            raise BodyError(TOO_LARGE)
        unfinished = self._deflate_head or (self._inflater is not None and self.received and not self._inflater.eof)
        if self._error is None and unfinished:
            self._fail(Problem("invalid_encoding", "Error reading request body",
                               "the compressed body ends before its end marker"))
        if self._error is not None:
            raise BodyError(self._error)
        return b"".join(self._chunks)


def _deflate_wbits(first: bytes) -> int:
    """HTTP's deflate is zlib-wrapped (RFC 9110), but some clients send raw deflate."""
    if len(first) >= 2 and first[0] & 0x0F == 8 and ((first[0] << 8) | first[1]) % 31 == 0:
        return zlib.MAX_WBITS
    return -zlib.MAX_WBITS
