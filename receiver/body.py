"""Reading a request body as it streams in: decompression, and limits on the inflated bytes.

Limits apply to the decompressed body, and inflation is bounded at every step
(``max_length``), so a small gzip bomb is refused without the process ever holding the
inflated body. Past a limit the reader keeps counting (and discarding) what still arrives, so
the handler can read the rest of the body and answer 413 instead of resetting the connection.

What a reader holds until its body is whole is what the client sent, not what it inflates to:
a compressed body is inflated as it arrives only to count and check it (the output thrown away
a ``INFLATE_STEP`` at a time), and inflated again, whole, once the last byte is in. A stalled
gzip body of 663 bytes that inflates to 500 KB holds 663 bytes, not 500 KB; inflating twice
costs about a millisecond per 500 KB body, for the few clients that compress.

Every byte held counts against the process's :class:`BodyBudget` (``max_buffered_bytes``):
a body that would take it past the cap is refused with ``503`` and what it held is let go.
"""

from __future__ import annotations

import zlib

from pipeline.messages import Problem

SUPPORTED_ENCODINGS = ("identity", "gzip", "x-gzip", "deflate")

TOO_LARGE = Problem("payload_too_large", "Error reading request body", "HTTP request too large", status=413)
BUFFERS_FULL = Problem("buffers_full", "Service unavailable",
                       "the receiver holds as many unfinished request bodies as it may; retry later",
                       status=503, error="Service Unavailable")

# Inflated output checked and thrown away in steps this large: what a stalled compressed body
# costs beyond its own bytes is one step, briefly.
INFLATE_STEP = 64 * 1024

# When to give freed body memory back (BodyBudget.trim_due): request bodies arrive as 64 KB
# pieces, below glibc's mmap threshold, so their pages stay with the process until trimmed.
TRIM_AFTER_BYTES = 8 * 1024 * 1024
TRIM_AFTER_INFLATERS = 100  # each some 40 KB


class BodyBudget:
    """Bytes held, in one process, by request bodies still arriving; ``cap`` bounds them."""

    __slots__ = ("cap", "held", "peak", "rested")

    def __init__(self, cap: int) -> None:
        self.cap, self.held, self.peak = cap, 0, 0
        self.rested = 0  # inflaters let go since the memory was last trimmed

    def full(self) -> bool:
        return self.held >= self.cap

    def take(self, size: int) -> bool:
        if self.held + size > self.cap:
            return False
        self.held += size
        if self.held > self.peak:
            self.peak = self.held
        return True

    def give(self, size: int) -> None:
        self.held -= size

    def trim_due(self) -> bool:
        """Whether enough has been let go to be worth giving back to the system: the bytes held
        fell TRIM_AFTER_BYTES below their peak, or TRIM_AFTER_INFLATERS inflaters were let go
        (pipeline/heap.py's release_free_memory does it). Resets the marks when it says so."""
        if self.peak - self.held < TRIM_AFTER_BYTES and self.rested < TRIM_AFTER_INFLATERS:
            return False
        self.peak, self.rested = self.held, 0
        return True


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

    def __init__(self, content_encoding: str | None, limit: int, budget: BodyBudget | None = None) -> None:
        name = (content_encoding or "identity").strip().lower()
        self._gzip = name in ("gzip", "x-gzip")
        self._deflate = name == "deflate"
        self._wbits = 31 if self._gzip else 0  # deflate's: known from its first two bytes
        self._inflater: zlib._Decompress | None = zlib.decompressobj(31) if self._gzip else None
        self._limit = limit
        self._budget = budget
        self._chunks: list[bytes] = []  # as sent: compressed bodies stay compressed until whole
        self._held = 0  # bytes of _chunks counted in the budget
        self._deflate_head = b""  # deflate's first byte, until a second tells zlib from raw
        self._size = 0  # the body's size, inflated
        self.received = 0
        self.too_large = False
        self.over_budget = False
        self._error: Problem | None = None
        self._rested = False  # the inflater was let go while the body stalled (rest_if_stalled)
        self._seen = 0

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.too_large or self.over_budget or self._error is not None:
            return  # discarding: we only count what is still arriving
        if self._deflate and self._inflater is None:
            chunk, self._deflate_head = self._deflate_head + chunk, b""
            if len(chunk) < 2:
                self._deflate_head = chunk
                return
            self._wbits = _deflate_wbits(chunk)
            self._inflater = zlib.decompressobj(self._wbits)
        if self._inflater is None:
            self._size += len(chunk)
            if self._size > self._limit:
                self._drop(too_large=True)
                return
            self._hold(chunk)
            return
        try:
            if self._rested:
                self._wake()
            self._hold(chunk)
            self._count_inflated(chunk)
        except zlib.error as exc:
            self._fail(Problem("invalid_encoding", "Error reading request body",
                               f"the body is not valid {'gzip' if self._gzip else 'deflate'} ({exc})"))

    def _count_inflated(self, data: bytes) -> None:
        while data and not self.too_large:
            assert self._inflater is not None
            # Never inflate more than one byte past the limit, nor more than a step, at once.
            out = self._inflater.decompress(data, min(self._limit - self._size + 1, INFLATE_STEP))
            self._size += len(out)
            if self._size > self._limit:
                self._drop(too_large=True)
                return
            data = self._inflater.unconsumed_tail
            if self._inflater.eof:
                # Concatenated gzip members are one body (RFC 1952 allows them).
                rest = self._inflater.unused_data
                if rest and self._gzip:
                    self._inflater = zlib.decompressobj(31)
                    data = rest
                elif rest.strip():
                    raise zlib.error("data after the end of the compressed stream")

    def rest_if_stalled(self) -> None:
        """Called once a second (receiver/timeouts.py): a compressed body that received nothing
        since the last call lets its inflater go (some 40 KB of zlib state and window, kept even
        past the stream's end) until more arrives or the body ends, when what it holds is
        inflated again to where it was. A stalled gzip body then costs what it sent."""
        if self._seen == self.received and self._inflater is not None and \
                not (self.too_large or self.over_budget or self._error):
            self._inflater, self._rested = None, True
            if self._budget is not None:
                self._budget.rested += 1
        self._seen = self.received

    def _wake(self) -> None:
        self._rested = False
        self._inflater = zlib.decompressobj(self._wbits)
        self._size = 0
        self._count_inflated(b"".join(self._chunks))

    def _hold(self, data: bytes) -> None:
        if self.over_budget or not data:
            return
        if self._budget is not None:
            if not self._budget.take(len(data)):
                self._drop(over_budget=True)
                return
            self._held += len(data)
        self._chunks.append(data)

    def _drop(self, too_large: bool = False, over_budget: bool = False) -> None:
        self.too_large = self.too_large or too_large
        self.over_budget = self.over_budget or over_budget
        self.release()

    def release(self) -> None:
        """Let go of what is held (the body is whole, refused, or its client has gone)."""
        self._chunks = []
        if self._budget is not None and self._held:
            self._budget.give(self._held)
        self._held = 0

    def _fail(self, problem: Problem) -> None:
        self._error = problem
        self.release()

    def finish(self) -> bytes:
        if self.too_large:
            raise BodyError(TOO_LARGE)
        if self.over_budget:
            raise BodyError(BUFFERS_FULL)
        if self._rested:
            try:
                self._wake()
            except zlib.error as exc:
                self._fail(Problem("invalid_encoding", "Error reading request body",
                                   f"the body is not valid {'gzip' if self._gzip else 'deflate'} ({exc})"))
        unfinished = self._deflate_head or (self._inflater is not None and self.received and not self._inflater.eof)
        if self._error is None and unfinished:
            self._fail(Problem("invalid_encoding", "Error reading request body",
                               "the compressed body ends before its end marker"))
        if self._error is not None:
            raise BodyError(self._error)
        sent = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self.release()
        return sent if self._inflater is None else self._inflate_whole(sent)

    def _inflate_whole(self, data: bytes) -> bytes:
        """The second pass: the same bytes the first pass checked, so the same (bounded) size."""
        pieces = []
        while data:
            inflater = zlib.decompressobj(self._wbits)
            pieces.append(inflater.decompress(data))
            data = inflater.unused_data if self._gzip else b""
        return b"".join(pieces)


def _deflate_wbits(first: bytes) -> int:
    """HTTP's deflate is zlib-wrapped (RFC 9110), but some clients send raw deflate."""
    if len(first) >= 2 and first[0] & 0x0F == 8 and ((first[0] << 8) | first[1]) % 31 == 0:
        return zlib.MAX_WBITS
    return -zlib.MAX_WBITS
