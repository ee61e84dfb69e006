"""Serving a `KubeEmulator` over HTTP on 127.0.0.1 from a background thread.

The server gets its own thread and event loop, so that blocking clients (the official `kubernetes`
client) in the test's thread and Kopf's loop in `KopfRunner`'s thread all reach it alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import pathlib
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp.web
import yaml

from tests.kubeapi.emulator import Body, KubeEmulator

T = TypeVar("T")


class KubeApiServer:
    """A running emulator: `.url`, `.kubeconfig_path` (once written), `.emulator`."""

    def __init__(self, emulator: KubeEmulator | None = None) -> None:
        self.emulator = emulator if emulator is not None else KubeEmulator()
        self.kubeconfig_path: pathlib.Path | None = None
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="kube-api", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def __enter__(self) -> Self:
        self._thread.start()
        self._started.result(timeout=30)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    async def _serve(self) -> None:
        try:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            async with self.emulator:  # kmock's background tasks (for the discovery it serves)
                runner = aiohttp.web.ServerRunner(aiohttp.web.Server(self.emulator), handle_signals=False)
                await runner.setup()
                site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                self._port = runner.addresses[0][1]
                self._started.set_result(None)
                await self._stop.wait()
                self.emulator.close_watches()  # open watches end within a poll interval
                await runner.cleanup()
        except BaseException as e:
            if not self._started.done():
                self._started.set_exception(e)
            raise

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the server's loop, where the emulator's state may be touched."""
        assert self._loop is not None, "the server is not running"

        async def run() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def register_crd(self, crd: Body) -> Body:
        return self.call(self.emulator.register_crd, crd)

    def collect_garbage(self) -> list[Body]:
        """Play the garbage collector once: delete objects whose owners are all gone."""
        return self.call(self.emulator.collect_garbage)

    def write_kubeconfig(self, path: pathlib.Path) -> pathlib.Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            # Kopf's login wants some credentials; the emulator checks none.
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "tester", "namespace": "default"},
                }
            ],
        }
        path.write_text(yaml.safe_dump(config))
        self.kubeconfig_path = path
        return path
