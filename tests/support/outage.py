"""A TCP proxy in front of a real server that can simulate an outage: while `down`, every connection is
accepted and closed at once (clients see resets), as a load balancer in front of a dead store does; with
`bytes_per_second`, answers come over a slow link; with `latency`, every request (the first bytes after a pause
in what the client sends) waits that long before it reaches the server (a distant or overloaded store)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import urlparse

HOST = "127.0.0.1"
REQUEST_GAP_SECONDS = 0.05  # a client pausing this long has sent its request and waits for the answer


class OutageProxy:
    """`host` and `port`: where it listens, loopback and a free port unless clients in another network namespace
    must reach it (a container's, through a veth pair: tests/images/containers.py; a real node's pods:
    tests/cluster/node.py)."""

    def __init__(self, upstream_url: str, host: str = HOST, port: int = 0) -> None:
        target = urlparse(upstream_url)
        self.upstream = (target.hostname or HOST, target.port or 80)
        self.down = False
        self.bytes_per_second: float | None = None  # throttle answers (a slow link), None: full speed
        self.latency = 0.0  # seconds each request waits before it reaches the server
        self.refused = 0  # connections cut during outages
        self._listener = socket.create_server((host, port))
        self.url = f"http://{host}:{self._listener.getsockname()[1]}"
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
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        last = 0.0
        try:
            while data := source.recv(4096 if throttled and self.bytes_per_second else 65536):
                if not throttled and self.latency and time.monotonic() - last > REQUEST_GAP_SECONDS:
                    time.sleep(self.latency)  # a new request, not the rest of one
                last = time.monotonic()
                sink.sendall(data)
                if throttled and self.bytes_per_second:
                    time.sleep(len(data) / self.bytes_per_second)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._closed = True
        # A close alone leaves the port bound while the accepting thread waits in accept(); a shutdown wakes it.
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


@contextmanager
def outage_proxy(upstream_url: str, host: str = HOST) -> Iterator[OutageProxy]:
    proxy = OutageProxy(upstream_url, host)
    try:
        yield proxy
    finally:
        proxy.close()
