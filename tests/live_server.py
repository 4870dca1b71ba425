"""A real cyborg server on a loopback port, run on its own event loop thread, for blocking clients."""

from __future__ import annotations

import asyncio
import threading

from serving.server import ServerConfig, create_server


class LiveServer:
    """`with LiveServer(repository, **config) as server:` then call `server.address`."""

    def __init__(self, repository, **config):
        options = {"host": "127.0.0.1", "port": 0, "metrics_port": None, "grace_seconds": 1.0} | config
        self.config = ServerConfig(model_repository=str(repository), **options)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="live-server")
        self.server = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, coroutine, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self):
        server, port = await create_server(self.config)
        await server.start()
        return server, port

    def __enter__(self) -> LiveServer:
        self.thread.start()
        try:
            self.server, self.port = self._run(self._start())
        except BaseException:
            self._close_loop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.server is not None:
                self._run(self.server.stop(0.5))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
