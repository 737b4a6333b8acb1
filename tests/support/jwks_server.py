"""A JWKS endpoint on loopback, in its own thread (so it answers while a test blocks on a process)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from aiohttp import web

from tests.support.sidecar_procs import free_port


class JwksServer:
    """Serves ``document`` at ``/jwks.json``; ``requests`` counts the fetches; ``status`` can fail them."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.status = 200
        self.requests = 0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jwks-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def publish(self, document: dict[str, Any]) -> None:
        self.document = document

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(
            status=self.status, body=json.dumps(self.document).encode(), content_type="application/json"
        )

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/jwks.json", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def start(self) -> JwksServer:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the JWKS server did not start")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
