"""Slides read over the network through fsspec: few, large, cached range requests.

:class:`RemoteFile` is the seekable binary file that tiffslide (tifffile) parses and reads. It
holds the byte ranges it has fetched in one bounded cache, shared by every reader thread, so the
TIFF header and tile offsets are read once per slide. Callers that know which tiles a read
needs hand them over first (:meth:`RemoteFile.prefetch`): neighbouring ranges are merged into
one request and all requests of a batch go out together. Anything else (the header, a read that
was not announced) is fetched on demand with a small read-ahead.

Transient faults (a timeout, a refused or dropped connection, HTTP 5xx, 408 or 429) are retried
a bounded number of times with exponential backoff; the others (404, 403, a server that ignores
Range requests) fail at once. Every error is one line that names the slide by its URL without
credentials (:class:`~zoompipe.slide.source.SlideSource`).
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_right, insort
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import SlideError, UsageError, one_line
from .source import SlideSource

# Class names (anywhere in an exception's MRO) that mean the peer went away mid-transfer:
# aiohttp's ServerDisconnectedError and ClientPayloadError, http.client's IncompleteRead,
# builtins' ConnectionResetError and BrokenPipeError.
_DROPPED = ("Disconnected", "Payload", "Reset", "IncompleteRead", "ShortRead", "BrokenPipe", "Aborted")


class RemoteError(SlideError):
    """A remote slide could not be fetched (not found, refused, timed out, dropped, denied)."""


@dataclass(frozen=True)
class RemoteSettings:
    """How remote slides are fetched.

    Attributes
    ----------
    timeout : float
        Seconds to connect, and seconds without data while reading, before a request fails.
    retries : int
        Further attempts of a request after a transient fault.
    backoff : float
        Seconds before the first retry; doubled before each further one.
    cache_bytes : int
        Bytes of one slide held in memory, least recently used dropped first.
    readahead : int
        Smallest request for a read that was not announced (TIFF header reads are tiny).
    merge_gap : int
        Announced ranges this close are fetched in one request, the gap included.
    """

    timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.5
    cache_bytes: int = 128 * 2**20
    readahead: int = 64 * 2**10
    merge_gap: int = 8 * 2**10

    @classmethod
    def from_env(cls) -> "RemoteSettings":
        """Defaults, overridden by ``ZOOMPIPE_REMOTE_TIMEOUT`` (s), ``_RETRIES`` and ``_CACHE_MB``.

        Raises
        ------
        UsageError
            A value that is not a number in range.
        """
        values: dict[str, Any] = {}
        for key, field_name, kind, low in (("ZOOMPIPE_REMOTE_TIMEOUT", "timeout", float, 1e-3),
                                           ("ZOOMPIPE_REMOTE_RETRIES", "retries", int, 0),
                                           ("ZOOMPIPE_REMOTE_CACHE_MB", "cache_bytes", float, 1)):
            text = os.environ.get(key)
            if not text:
                continue
            try:
                value = kind(text)
            except ValueError:
                value = None
            if value is None or value < low:
                raise UsageError(f"{key}={text!r} is not a number of at least {low:g}")
            values[field_name] = int(value * 2**20) if field_name == "cache_bytes" else value
        return cls(**values)


@dataclass(frozen=True)
class TransferStats:
    """What reading a remote slide cost: bytes received, requests sent (retries included)."""

    bytes_fetched: int
    requests: int
    retries: int
    file_size: int

    @property
    def share(self) -> float:
        """Bytes fetched over the file's size."""
        return self.bytes_fetched / max(self.file_size, 1)

    def to_dict(self) -> dict[str, int | float]:
        return {"bytes_fetched": self.bytes_fetched, "requests": self.requests, "retries": self.retries,
                "file_size": self.file_size, "share": round(self.share, 6)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransferStats":
        return cls(int(data["bytes_fetched"]), int(data["requests"]), int(data["retries"]), int(data["file_size"]))

    def describe(self) -> str:
        return (f"fetched {self.bytes_fetched / 2**20:.2f} MiB of {self.file_size / 2**20:.2f} MiB "
                f"({100 * self.share:.2f}%) in {self.requests} requests ({self.retries} retries)")


class _RangeIgnored(Exception):
    """The server answered a range request with more bytes than asked: it ignores Range."""


class _ShortRead(Exception):
    """Fewer bytes than asked for: the connection ended early."""


def _classify(err: BaseException, timeout: float) -> tuple[bool, str]:
    """Whether a fault is worth retrying, and what to call it (no text from the exception that may hold the URL)."""
    # fsspec's HTTP driver turns any failure to learn a file's size into FileNotFoundError.
    while isinstance(err, FileNotFoundError) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, FileNotFoundError):
        return False, "not found"
    if isinstance(err, PermissionError):
        return False, "access denied; check the credentials"
    if isinstance(err, _RangeIgnored):
        return False, "the server ignores HTTP Range requests, so a slide cannot be read in parts"
    status = getattr(err, "status", None)
    if status == 404:
        return False, "not found (HTTP 404)"
    if status in (401, 403):
        return False, f"HTTP {status}: access denied; check the credentials"
    if isinstance(status, int):
        return status in (408, 425, 429) or status >= 500, f"HTTP {status}"
    names = [cls.__name__ for cls in type(err).__mro__]
    if any("Timeout" in n for n in names):
        return True, f"timed out after {timeout:g} s"
    if isinstance(err, ConnectionRefusedError) or isinstance(getattr(err, "os_error", None), ConnectionRefusedError):
        return True, "connection refused"
    if any(word in n for n in names for word in _DROPPED):
        return True, "connection dropped mid-read"
    if isinstance(err, OSError) or any("Connect" in n for n in names):
        return True, f"network error ({type(err).__name__})"
    return False, f"{type(err).__name__}: {one_line(err)}"


def _storage_options(protocol: str, timeout: float) -> dict[str, Any]:
    """fsspec options that bound the time of one request; credentials stay with fsspec's own lookup."""
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                   sock_read=timeout)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout}}
    return {}


class _Extents:
    """Non-overlapping byte ranges of one file, least recently used dropped past a budget. Not locked."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._starts: list[int] = []
        self._data: dict[int, bytes] = {}
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._bytes = 0

    def _overlapping(self, start: int, end: int) -> list[int]:
        i = max(bisect_right(self._starts, start) - 1, 0)
        found = []
        while i < len(self._starts) and self._starts[i] < end:
            s = self._starts[i]
            if s + len(self._data[s]) > start:
                found.append(s)
            i += 1
        return found

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` that are not held."""
        gaps, pos = [], start
        for s in self._overlapping(start, end):
            if s > pos:
                gaps.append((pos, s))
            pos = max(pos, s + len(self._data[s]))
        if pos < end:
            gaps.append((pos, end))
        return gaps

    def pieces(self, start: int, end: int) -> list[tuple[int, bytes]]:
        """The held ranges that overlap ``[start, end)``, marked as recently used."""
        found = self._overlapping(start, end)
        for s in found:
            self._recent.move_to_end(s)
        return [(s, self._data[s]) for s in found]

    def add(self, start: int, data: bytes) -> None:
        """Hold the parts of ``data`` (bytes from ``start``) that are not held yet."""
        for gap_start, gap_end in self.missing(start, start + len(data)):
            piece = data[gap_start - start:gap_end - start]
            insort(self._starts, gap_start)
            self._data[gap_start] = piece
            self._recent[gap_start] = None
            self._bytes += len(piece)
        while self._bytes > self._budget and self._recent:
            oldest, _ = self._recent.popitem(last=False)
            self._starts.pop(bisect_right(self._starts, oldest) - 1)
            self._bytes -= len(self._data.pop(oldest))


def _assemble(start: int, end: int, pieces: Sequence[tuple[int, bytes]]) -> bytes:
    out = bytearray(end - start)
    for s, data in pieces:
        lo, hi = max(s, start), min(s + len(data), end)
        if hi > lo:
            out[lo - start:hi - start] = data[lo - s:hi - s]
    return bytes(out)


class RemoteFile:
    """A remote file as a thread-safe, seekable, read-only binary stream with a shared range cache.

    Use :meth:`open`. Each thread has its own position; reads by absolute offset
    (:meth:`read_at`, :meth:`prefetch`) need none.
    """

    def __init__(self, source: SlideSource, fs: Any, path: str, settings: RemoteSettings) -> None:
        self.source = source
        self.name = source.slide_id + os.path.splitext(source.name)[1]  # tifffile names its handle by this
        self._fs, self._path, self._settings = fs, path, settings
        self._lock = threading.Lock()
        self._cache = _Extents(settings.cache_bytes)
        self._position = threading.local()
        self._bytes = self._requests = self._retries = 0
        self.size = int(self._retry([None], lambda todo: [self._call(self._fs.size, self._path)])[0] or 0)
        if self.size <= 0:
            raise RemoteError(f"{source}: empty file, or the server does not tell its size")

    @classmethod
    def open(cls, source: SlideSource, settings: RemoteSettings | None = None) -> "RemoteFile":
        """Connect to a remote slide and learn its size (one request).

        Raises
        ------
        RemoteError
            An unknown protocol, a missing fsspec driver, or any fault of :class:`RemoteFile`.
        """
        from fsspec.core import url_to_fs, split_protocol

        settings = settings or RemoteSettings.from_env()
        protocol = split_protocol(source.location)[0] or ""
        try:
            fs, path = url_to_fs(source.location, **_storage_options(protocol, settings.timeout))
        except (ImportError, ValueError) as err:
            raise RemoteError(source.scrub(f"{source}: cannot read {protocol}:// URLs here: {one_line(err)}")) from None
        return cls(source, fs, path, settings)

    # -- accounting ---------------------------------------------------------------------------

    def stats(self) -> TransferStats:
        with self._lock:
            return TransferStats(self._bytes, self._requests, self._retries, self.size)

    # -- fetching -----------------------------------------------------------------------------

    @staticmethod
    def _call(function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(*args)
        except Exception as err:  # classified by _retry
            return err

    def _retry(self, items: list, run: Callable[[list], list]) -> list:
        """``run`` over ``items`` (results or exceptions, in order), again over the failed ones after a transient fault."""
        results: list = [None] * len(items)
        todo = list(range(len(items)))
        for attempt in range(self._settings.retries + 1):
            if attempt:
                time.sleep(self._settings.backoff * 2 ** (attempt - 1))
            outcomes = run([items[i] for i in todo])
            with self._lock:
                self._requests += len(todo)
                self._retries += len(todo) if attempt else 0
                self._bytes += sum(len(o) for o in outcomes if isinstance(o, bytes))
            failed, reason = [], ""
            for i, outcome in zip(todo, outcomes):
                if not isinstance(outcome, BaseException):
                    results[i] = outcome
                    continue
                transient, reason = _classify(outcome, self._settings.timeout)
                if not transient:
                    raise RemoteError(f"{self.source}: {self.source.scrub(reason)}")
                failed.append(i)
            if not failed:
                return results
            todo = failed
        raise RemoteError(f"{self.source}: {self.source.scrub(reason)} "
                          f"({self._settings.retries + 1} attempts)")

    def _fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of every ``[start, end)``, requested together."""
        def run(todo: list[tuple[int, int]]) -> list:
            try:
                outcomes = self._fs.cat_ranges([self._path] * len(todo), [s for s, _ in todo],
                                               [e for _, e in todo], on_error="return")
            except Exception as err:  # a driver that raises instead of returning per-range errors
                outcomes = [err] * len(todo)
            checked: list = []
            for (s, e), out in zip(todo, outcomes):
                if isinstance(out, bytes) and len(out) > e - s:
                    out = _RangeIgnored()
                elif isinstance(out, bytes) and len(out) < e - s:
                    out = _ShortRead()
                checked.append(out)
            return checked
        return self._retry(ranges, run) if ranges else []

    def _fill(self, spans: list[tuple[int, int]], readahead_to: int = 0) -> list[tuple[int, bytes]]:
        """Fetch what the cache lacks of ``spans``; return the pieces that cover them."""
        with self._lock:
            gaps = [gap for s, e in spans for gap in self._cache.missing(s, e)]
            pieces = [piece for s, e in spans for piece in self._cache.pieces(s, e)]
        if gaps and gaps[-1][1] == spans[-1][1] and readahead_to > gaps[-1][1]:
            gaps[-1] = (gaps[-1][0], min(readahead_to, self.size))
        fetched = list(zip((s for s, _ in gaps), self._fetch(gaps)))
        with self._lock:
            for start, data in fetched:
                self._cache.add(start, data)
        return pieces + fetched

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Bring byte ranges ``[start, end)`` into the cache, merging neighbours into one request each."""
        spans: list[list[int]] = []
        for start, end in sorted((max(s, 0), min(e, self.size)) for s, e in ranges):
            if end <= start:
                continue
            if spans and start - spans[-1][1] <= self._settings.merge_gap:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        self._fill([(s, e) for s, e in spans])

    def read_at(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` (fewer at the end of the file)."""
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        readahead_to = offset + self._settings.readahead if size < self._settings.readahead else 0
        return _assemble(offset, end, self._fill([(offset, end)], readahead_to))

    # -- the binary stream tifffile reads -----------------------------------------------------

    def tell(self) -> int:
        return getattr(self._position, "offset", 0)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.tell(), 2: self.size}[whence]
        self._position.offset = max(base + offset, 0)
        return self._position.offset

    def read(self, size: int = -1) -> bytes:
        position = self.tell()
        data = self.read_at(position, self.size - position if size is None or size < 0 else size)
        self._position.offset = position + len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        with self._lock:
            self._cache = _Extents(self._settings.cache_bytes)
