"""A real HTTP server on 127.0.0.1 for remote-slide tests and benchmarks/remote.py.

aiohttp's own static file response serves the slides: it implements Range, HEAD and
If-Range itself (RFC 7233), so the client is tested against a server whose range code is not
ours. aiohttp is a run-time dependency of zoompipe already (fsspec's HTTP driver), so the tests
need nothing from the distribution's packages, as nginx would. Every request goes to the server's
own access log (a file), which records the status and the body bytes of each response.

Fault routes, for the network-fault tests:

- ``/files/NAME``: the file (``?token=...`` required when the server has a token: 403 otherwise);
- ``/slow/NAME``: answers nothing for ``stall`` seconds (a timeout);
- ``/drop/NAME``: headers and half the body of every range, then the connection is closed;
- ``/flaky/NAME``: as ``/drop`` for the first request of each range, then as ``/files``;
- ``/norange/NAME``: the whole file whatever the Range header says.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from pathlib import Path

from aiohttp import web
from aiohttp.web_log import AccessLogger

LOG_FORMAT = '%s %{Content-Length}o "%r"'
_LINE = re.compile(r'^(\d{3}) (\S+) "(\w+) (\S+) HTTP')


class SlideServer:
    """Serve the files of ``root`` at ``http://127.0.0.1:<port>/files/<name>`` from a background thread."""

    def __init__(self, root: Path, log_path: Path, token: str | None = None, stall: float = 5.0) -> None:
        self.root, self.log_path, self.token, self.stall = Path(root), Path(log_path), token, stall
        self._seen_ranges: set[tuple[str, str]] = set()
        self._started = self._logged = 0  # requests received, and written to the log
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="slide-server")
        self._ready = threading.Event()
        self.port = 0

    # -- routes -------------------------------------------------------------------------------

    def _file(self, request: web.Request) -> Path:
        path = self.root / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return path

    async def _files(self, request: web.Request) -> web.StreamResponse:
        if self.token is not None and request.query.get("token") != self.token:
            raise web.HTTPForbidden()
        return web.FileResponse(self._file(request))

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(self.stall)
        return web.FileResponse(self._file(request))

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        path = self._file(request)
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
        if request.method == "HEAD" or match is None:
            return web.FileResponse(path)
        start, end = int(match.group(1)), int(match.group(2)) + 1
        with path.open("rb") as handle:
            handle.seek(start)
            data = handle.read(end - start)
        response = web.StreamResponse(status=206, headers={
            "Content-Length": str(len(data)), "Content-Range": f"bytes {start}-{end - 1}/{path.stat().st_size}"})
        await response.prepare(request)
        await response.write(data[:len(data) // 2])
        request.transport.close()
        return response

    async def _flaky(self, request: web.Request) -> web.StreamResponse:
        key = (request.match_info["name"], request.headers.get("Range", ""))
        if request.method == "GET" and key[1] and key not in self._seen_ranges:
            self._seen_ranges.add(key)
            return await self._drop(request)
        return web.FileResponse(self._file(request))

    async def _norange(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._file(request).read_bytes())

    # -- life cycle ---------------------------------------------------------------------------

    @web.middleware
    async def _count(self, request: web.Request, handler):
        self._started += 1
        return await handler(request)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self

        class CountingLogger(AccessLogger):
            def log(self, request, response, time):  # noqa: A002 (aiohttp's signature)
                super().log(request, response, time)
                server._logged += 1

        app = web.Application(middlewares=[self._count])
        for prefix, handler in (("files", self._files), ("slow", self._slow), ("drop", self._drop),
                                ("flaky", self._flaky), ("norange", self._norange)):
            app.router.add_get(f"/{prefix}/{{name}}", handler)  # HEAD too
        logger = logging.getLogger(f"slide-server-{id(self)}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        self._handler = logging.FileHandler(self.log_path, mode="w")
        logger.addHandler(self._handler)
        runner = web.AppRunner(app, access_log=logger, access_log_format=LOG_FORMAT, access_log_class=CountingLogger,
                               shutdown_timeout=0.5)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._runner = runner
        self._ready.set()
        self._loop.run_forever()
        logger.removeHandler(self._handler)
        self._handler.close()

    def __enter__(self) -> "SlideServer":
        self._thread.start()
        self._ready.wait(10)
        return self

    async def _shutdown(self) -> None:
        await self._runner.cleanup()
        # Handlers of dropped and stalled requests outlive the cleanup; end them before the loop stops.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, name: str, route: str = "files") -> str:
        query = f"?token={self.token}" if self.token is not None and route == "files" else ""
        return f"http://127.0.0.1:{self.port}/{route}/{name}{query}"

    def log(self) -> list[dict]:
        """The access log so far: status, method, target (with its query) and body bytes of each request.

        A response reaches the client a moment before the server logs it: wait for the log to
        hold every request received.
        """
        deadline = time.monotonic() + 5
        while self._logged < self._started and time.monotonic() < deadline:
            time.sleep(0.01)
        self._handler.flush()
        records = []
        for line in self.log_path.read_text().splitlines():
            match = _LINE.match(line)
            if match:
                status, length, method, target = match.groups()
                body = int(length) if method == "GET" and length.isdigit() else 0  # HEAD sends no body
                records.append({"status": int(status), "method": method, "target": target, "body_bytes": body})
        return records
