"""Bounded decoding of HTTP content codings (gzip, deflate, zstd), so a compressed bomb cannot fill memory.

httpx's own decoders turn each network chunk into all the bytes it expands to (a 32 KB zstd body
becomes 1 GiB in one call); ``BoundedDecoder`` never makes more than ``limit`` + one piece of
decoded bytes per coding, whatever the ratio.
"""

from __future__ import annotations

import importlib.util
import logging
import zlib
from typing import IO, Protocol, cast

__all__ = [
    "ACCEPT_ENCODING",
    "SUPPORTED_CODINGS",
    "ZSTD_MAX_WINDOW",
    "ZSTD_PIECE",
    "BoundedDecoder",
    "ContentCodingError",
]

logger = logging.getLogger(__name__)

#: Largest zstd window accepted, in bytes: RFC 9659 section 3 limits HTTP zstd encoders to 8 MB windows.
ZSTD_MAX_WINDOW = 8 * 1024 * 1024
#: Most decoded bytes zstd hands over at once (the bound on overshoot past the limit).
ZSTD_PIECE = 128 * 1024


#: Content codings decoded here, in the order advertised (``zstd`` only when ``zstandard`` is installed).
SUPPORTED_CODINGS: tuple[str, ...] = ("gzip", "deflate") + (
    ("zstd",) if importlib.util.find_spec("zstandard") is not None else ()
)
#: ``Accept-Encoding`` value naming exactly the codings decoded here.
ACCEPT_ENCODING = ", ".join(SUPPORTED_CODINGS)


class ContentCodingError(ValueError):
    """A body's ``Content-Encoding`` is not supported, or its bytes are not valid in that coding."""


class _Layer(Protocol):
    def decode(self, data: bytes, room: int) -> bytes:
        """Decode ``data``; return at most ``room + 1`` bytes (more than ``room`` means over the limit)."""
        ...


class _Identity:
    def decode(self, data: bytes, room: int) -> bytes:
        return data[: room + 1]


class _Zlib:
    """gzip (RFC 1952) or deflate (RFC 9110 section 8.4.1.2: zlib format, RFC 1950; a raw RFC 1951
    stream, as some servers send, is accepted too, as httpx and browsers do)."""

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._raw_fallback = coding == "deflate"
        self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS)

    def decode(self, data: bytes, room: int) -> bytes:
        if not data:
            return b""
        try:
            # With max_length, zlib stops there and leaves the rest in unconsumed_tail: an output
            # shorter than max_length means all input was used and nothing is pending.
            out = self._inflater.decompress(data, room + 1)
        except zlib.error as exc:
            if self._raw_fallback:
                self._raw_fallback = False
                self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.decode(data, room)
            raise ContentCodingError(f"invalid {self._coding} data: {exc}") from exc
        self._raw_fallback = False
        return out


class _Full(Exception):
    """Raised by ``_Sink`` inside zstandard's write loop to stop decompression at the limit."""


class _Sink:
    """The file zstandard's stream writer writes decoded pieces to; stops it past ``room`` bytes."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0
        self.room = 0

    def write(self, data: bytes) -> int:
        self.pieces.append(bytes(data))
        self.size += len(data)
        if self.size > self.room:
            raise _Full
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.pieces)
        self.pieces.clear()
        self.size = 0
        return out


class _Zstd:
    """zstd (RFC 8878; content coding RFC 9659), frames one after another, window at most 8 MB.

    ``zstandard``'s decompression objects return all output of an input at once, so its stream
    writer is used: it hands decoded pieces of at most ``ZSTD_PIECE`` bytes to ``_Sink``, which
    stops it once the limit is passed.
    """

    def __init__(self) -> None:
        import zstandard

        self._error = zstandard.ZstdError
        self._sink = _Sink()
        self._writer = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_writer(
            cast(IO[bytes], self._sink), write_size=ZSTD_PIECE, write_return_read=True, closefd=False
        )

    def decode(self, data: bytes, room: int) -> bytes:
        self._sink.room = room
        try:
            self._writer.write(data)
        except _Full:
            pass
        except self._error as exc:
            raise ContentCodingError(f"invalid zstd data: {exc}") from exc
        return self._sink.take()


def _layer(coding: str) -> _Layer:
    if coding in ("gzip", "deflate"):
        return _Zlib(coding)
    if coding == "zstd" and "zstd" in SUPPORTED_CODINGS:
        return _Zstd()
    raise ContentCodingError(
        f"Content-Encoding {coding!r} is not supported (supported: {', '.join(SUPPORTED_CODINGS)})"
    )


class BoundedDecoder:
    """Decodes a body sent with ``Content-Encoding``, keeping at most ``limit`` decoded bytes.

    Feed it the raw (still encoded) chunks in order (``httpx.Response.aiter_raw``); each call returns
    the decoded bytes of that chunk. Every coding in a chain is held to ``limit``: once one has made
    more than ``limit`` bytes in all, ``exceeded`` is set, the output is cut at ``limit`` bytes and the
    caller stops feeding. A coding makes at most one piece beyond the limit before it stops: one byte
    for gzip and deflate, ``ZSTD_PIECE`` bytes for zstd.

    Args:
        content_encoding: the header's value, codings in the order they were applied (RFC 9110
            section 8.4), e.g. ``"gzip"`` or ``"deflate, gzip"``; ``""`` and ``identity`` mean none,
            ``x-gzip`` is ``gzip`` (RFC 9110 section 8.4.1.3). Case and spaces are ignored.
        limit: most decoded bytes kept (>= 0).

    Attributes:
        codings: the codings to undo, in the order applied.
        produced: decoded bytes returned so far.
        exceeded: True once the decoded body (or an intermediate coding) passed ``limit``.

    Raises:
        ContentCodingError: a coding is not one of ``SUPPORTED_CODINGS``; also from ``decode`` when
            the bytes are not valid in their coding.

    Example:
        >>> decoder = BoundedDecoder("gzip", limit=2_000_000)
        >>> body = b"".join(decoder.decode(chunk) for chunk in chunks)  # stop when decoder.exceeded
    """

    def __init__(self, content_encoding: str, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"BoundedDecoder limit must be >= 0 bytes, got {limit}")
        names = [c.strip().lower() for c in content_encoding.split(",")]
        self.codings = ["gzip" if c == "x-gzip" else c for c in names if c and c != "identity"]
        self.limit = limit
        self.exceeded = False
        # Undo the last coding applied first; identity last, so the output is cut at the limit.
        self._layers: list[_Layer] = [_layer(c) for c in reversed(self.codings)] + [_Identity()]
        self._made = [0] * len(self._layers)

    @property
    def produced(self) -> int:
        """Decoded bytes returned so far."""
        return self._made[-1]

    def decode(self, raw: bytes) -> bytes:
        """Decode one raw chunk; returns its decoded bytes (b"" when it completes nothing yet).

        Raises:
            ContentCodingError: the bytes are not valid in their coding.
        """
        data = raw
        for i, layer in enumerate(self._layers):
            room = self.limit - self._made[i]
            data = layer.decode(data, room)
            if len(data) > room:
                logger.debug("decoded body passed %d bytes (codings %s)", self.limit, self.codings)
                self.exceeded = True
                data = data[:room]
            self._made[i] += len(data)
            if not data:
                return b""
        return data
