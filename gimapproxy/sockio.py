"""Socket helpers for the hot path: the common case costs one system call.

gevent's `sendall` asks the kernel for the send buffer size, takes the time and builds a
memoryview before its first `send`; a response of a few hundred bytes needs none of
that. `recv_when_ready` waits before it reads where gevent's `recv` would try, fail with
EAGAIN and then wait. `readable` asks the kernel directly, without yielding to the hub
as a monkey-patched `select` does. (The relay's own socket handling, which never blocks,
is gimapproxy.duplex.)

Waiting before reading uses the read watcher each gevent socket keeps (`_read_event`,
waited on with `_wait`): private gevent API, unchanged from gevent 1.3 through 26.
Whether it is there is checked once, at import (SOCKET_WATCHER). Without it, the read is
a plain `recv`.
"""
from __future__ import annotations

from typing import Optional

import gevent
from gevent import monkey, socket, ssl

__all__ = ['send_all', 'recv_when_ready', 'readable']

# The real poll(), whether or not the process is monkey-patched: with a zero timeout it
# never blocks, and it must not switch greenlets under the caller. Not select(): it
# cannot take a descriptor above 1023, and a busy proxy has thousands.
_poll = monkey.get_original('select', 'poll')
_POLLIN = monkey.get_original('select', 'POLLIN')

# gevent's sockets (TLS ones inherit it) keep a read watcher and a method that waits on
# it. When a gevent release drops either, the public fallbacks below take over; the
# tests flip this to run both paths, nothing else may.
def _has_socket_watcher() -> bool:
    return (hasattr(socket.socket, '_read_event')
            and callable(getattr(socket.socket, '_wait', None)))


SOCKET_WATCHER = _has_socket_watcher()


def send_all(sock, data: bytes, timeout: Optional[float]) -> None:
    """Write all of `data` to a gevent socket (plain or TLS) within `timeout` seconds
    (None: no limit).

    One `send` writes a whole response whenever the socket buffer has room, which it
    almost always has; only what did not fit goes through gevent's `sendall`.

    Raises:
        OSError: the peer is gone, or `timeout` passed (socket.timeout).
    """
    sent = sock.send(data, 0, timeout)
    if sent < len(data):
        rest = memoryview(data)[sent:]
        if timeout is None:
            sock.sendall(rest)
        else:
            with gevent.Timeout(timeout, socket.timeout('write timeout')):
                sock.sendall(rest)


def recv_when_ready(sock, size: int) -> bytes:
    """Wait until `sock` (a gevent socket, plain or TLS) has something, then read up to
    `size` bytes; b'' at EOF.

    gevent's `recv` tries first and waits after EAGAIN, which costs an exception each
    time. Right after a request or a response has gone out, nothing is there yet, so
    this waits first. The wait is the socket's own (gevent's `_wait` on its read
    watcher), so closing the socket ends it as it ends a `recv`, and the socket's
    timeout applies. Without that watcher (SOCKET_WATCHER false) this is a plain `recv`.

    Raises:
        OSError: as `recv` does (socket.timeout included).
    """
    if SOCKET_WATCHER and not _pending(sock) and sock._read_event is not None:  # None: closed
        sock._wait(sock._read_event)
    return sock.recv(size)


def readable(sock) -> bool:
    """True when a read on `sock` would not block: bytes or EOF are waiting (a TLS
    socket's decrypted but unread bytes count). Never switches greenlets."""
    try:
        if _pending(sock):
            return True
        poller = _poll()
        poller.register(sock.fileno(), _POLLIN)
        return bool(poller.poll(0))           # data, EOF, or an error: all mean "gone"
    except (OSError, ValueError):
        return True


def _pending(sock) -> bool:
    """True when a TLS socket holds decrypted bytes not read yet (the kernel cannot see
    those)."""
    return isinstance(sock, ssl.SSLSocket) and bool(sock.pending())
