"""A TCP proxy in front of a real server that can simulate an outage: while `down`, every connection is
accepted and closed at once (clients see resets), as a load balancer in front of a dead store does."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import urlparse

HOST = "127.0.0.1"


class OutageProxy:
    def __init__(self, upstream_url: str) -> None:
        target = urlparse(upstream_url)
        self.upstream = (target.hostname or HOST, target.port or 80)
        self.down = False
        self.refused = 0  # connections cut during outages
        self._listener = socket.create_server((HOST, 0))
        self.url = f"http://{HOST}:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, name="outage-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # RST
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()


@contextmanager
def outage_proxy(upstream_url: str) -> Iterator[OutageProxy]:
    proxy = OutageProxy(upstream_url)
    try:
        yield proxy
    finally:
        proxy.close()
