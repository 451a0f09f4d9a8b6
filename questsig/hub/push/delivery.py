"""Sending one push: an HTTP POST to the push service, bounded by push-timeout as a whole.

Runs on a push thread (blocking). 2xx is success, 404/410 say the subscription is gone, anything
else is the push service's refusal; there are no retries. The endpoint is a URL a client chose,
so redirects are not followed, the response body is never read, and no credentials of the
operator (``~/.netrc``) are ever sent.
"""
from __future__ import annotations

import socket
import threading
from typing import Any

import requests
import urllib3
from twisted.python.failure import Failure

from questsig.hub.push.crypto import PushRequest


_sessions = threading.local()


def _headers_as_given(prepared: Any) -> Any:
    return prepared


class _Deadline:
    """push-timeout for a whole push. requests' timeout bounds each socket operation only, so
    a push service (any host a client names) that trickles its TLS handshake or response
    would hold a push thread, and with four of them every user's pushes, for as long as it
    liked; past the deadline the socket is shut down."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.passed = False

    def watch(self, sock: socket.socket | None) -> None:
        with self.lock:
            self.sock = sock
            passed = self.passed
        if passed:
            self._shut(sock)

    def cut(self) -> None:
        with self.lock:
            self.passed = True
            sock = self.sock
        self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket | None) -> None:
        if sock is not None:
            try:
                # the plain socket's shutdown, also under TLS: SSLSocket.shutdown would unwrap
                # the TLS state under the push thread's feet
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


class _WatchedConnection:
    """Tells the thread's current :class:`_Deadline` which socket a push uses."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        deadline = getattr(_sessions, "deadline", None)
        if deadline is not None:
            deadline.watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        deadline = getattr(_sessions, "deadline", None)
        if deadline is not None:  # also a kept-alive connection
            deadline.watch(getattr(self, "sock", None))
        super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_WatchedConnection, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _session() -> requests.Session:
    session = getattr(_sessions, "session", None)
    if session is None:
        session = _sessions.session = requests.Session()
        for adapter in session.adapters.values():
            adapter.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool,
                                                          "https": _HTTPSPool}
    return session


def post(request: PushRequest, timeout: float) -> int:
    """Send one push and return the HTTP status (blocking: runs on a push thread)."""
    session = _session()
    deadline = _sessions.deadline = _Deadline()
    timer = threading.Timer(timeout, deadline.cut)
    timer.daemon = True
    timer.start()
    try:
        return _post(session, request, timeout)
    except Exception as e:
        if deadline.passed:
            raise requests.Timeout(f"no answer within {timeout:g} s") from e
        raise
    finally:
        timer.cancel()
        _sessions.deadline = None


def _post(session: requests.Session, request: PushRequest, timeout: float) -> int:
    # redirects could point a client-supplied endpoint anywhere; the body is never needed;
    # an explicit auth keeps requests from sending the operator's ~/.netrc credentials to
    # whatever host a client names (and from replacing the VAPID Authorization header)
    response = session.post(request.url, data=request.body, headers=request.headers,
                            timeout=timeout, allow_redirects=False, stream=True,
                            auth=_headers_as_given)
    response.close()
    return response.status_code



def failure_kind(failure: Failure) -> str:
    if failure.check(requests.Timeout):
        return "timeout"
    if failure.check(requests.ConnectionError):
        return "unreachable"
    return "error"

