"""A whole-request deadline for urllib (the LLM judge's requests, `pipeline.align.judge`): when it passes, the
request's socket is shut down, so a blocked read (a server trickling its status line, headers or body) fails at
once instead of after every byte's own socket timeout.

Imports: the standard library only.
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.request


class DeadlinePassed(Exception):
    """The whole-request deadline passed (`Deadline.check`)."""


def _shutdown(sock) -> None:
    try:  # the plain-socket method, also for an SSLSocket (wakes a read blocked in another thread)
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class Deadline:
    """A whole-request deadline: when `seconds` pass, the request's socket is shut down, so a blocked read
    (a server trickling its status line, headers or body) fails at once instead of after every byte's
    own socket timeout. Use as a context manager around the request; `opener()` makes the connections."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.fired = False
        self._socks: list = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            socks = list(self._socks)
        for sock in socks:
            _shutdown(sock)

    def attach(self, sock) -> None:
        with self._lock:
            self._socks.append(sock)
            fired = self.fired
        if fired:
            _shutdown(sock)

    def check(self) -> None:
        if self.fired:
            raise DeadlinePassed()

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        return False

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib's default opener (proxies from the environment included) whose HTTP(S) connections register
        their socket with this deadline."""
        deadline = self

        def attached(cls):
            class Conn(cls):
                def connect(self):
                    super().connect()
                    deadline.attach(self.sock)

            return Conn

        class HTTP(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(attached(http.client.HTTPConnection), req)

        handlers = [HTTP()]
        if hasattr(http.client, "HTTPSConnection"):

            class HTTPS(urllib.request.HTTPSHandler):
                def https_open(self, req):
                    return self.do_open(attached(http.client.HTTPSConnection), req, context=self._context)

            handlers.append(HTTPS())
        return urllib.request.build_opener(*handlers)
