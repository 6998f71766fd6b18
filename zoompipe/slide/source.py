"""Where a slide lives: a local file or a URL (``https://``, ``s3://``, any fsspec protocol).

A URL may carry credentials (``user:password@``, a signed query string). The location as given
is kept for the one place that needs it, the fsspec call that opens the file; everything that
is printed, logged or written shows :attr:`SlideSource.name`, the URL without them.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

# A scheme of two letters or more: "C://" is a Windows drive, not a URL.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(location: str | Path) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and _URL.match(location) is not None


def redact_url(url: str) -> str:
    """``url`` without user name, password, query string and fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _secrets(url: str) -> list[str]:
    """The parts of ``url`` that may hold credentials, longest first."""
    parts = urlsplit(url)
    found = [url, parts.query, parts.fragment, parts.password or "", parts.username or ""]
    found += [value for _, value in parse_qsl(parts.query, keep_blank_values=True)]
    found += [unquote(s) for s in found]
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


@dataclass(frozen=True)
class SlideSource:
    """A slide's location.

    Attributes
    ----------
    location : str
        As given, credentials included: only for opening the file, never for printing.
    name : str
        What outputs, logs and errors show: the path, or the URL without credentials.
    slide_id : str
        The file name without its extension (for a URL, the last segment of its path).
    remote : bool
    """

    location: str = field(repr=False)
    name: str
    slide_id: str
    remote: bool

    @property
    def local_path(self) -> Path:
        return Path(self.location)

    def scrub(self, text: str) -> str:
        """``text`` with any credential of this location replaced by ``***`` (the full URL by its name)."""
        if not self.remote:
            return text
        text = text.replace(self.location, self.name)
        for secret in _secrets(self.location):
            text = text.replace(secret, "***")
        return text

    def __str__(self) -> str:
        return self.name


def slide_source(location: str | Path | SlideSource) -> SlideSource:
    """The :class:`SlideSource` of a path, a URL or a source."""
    if isinstance(location, SlideSource):
        return location
    if is_url(location):
        url = str(location)
        file_name = unquote(posixpath.basename(urlsplit(url).path))
        return SlideSource(url, redact_url(url), PurePosixPath(file_name).stem, True)
    path = Path(location)
    return SlideSource(str(path), str(path), path.stem, False)
