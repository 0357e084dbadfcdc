"""Socket helpers for the hot path: the common case costs one system call.

gevent's `sendall` asks the kernel for the send buffer size, takes the time and builds a
memoryview before its first `send`; a response of a few hundred bytes needs none of
that. `has_input` asks the kernel directly, without yielding to the hub as a
monkey-patched `select` does.
"""
from __future__ import annotations

from typing import Optional

import gevent
from gevent import monkey, socket

__all__ = ['send_all', 'readable']

# The real select(), whether or not the process is monkey-patched: with a zero timeout
# it never blocks, and it must not switch greenlets under the caller.
_select = monkey.get_original('select', 'select')


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


def readable(sock) -> bool:
    """True when a read on `sock` would not block: bytes or EOF are waiting (a TLS
    socket's decrypted but unread bytes count). Never switches greenlets."""
    pending = getattr(sock, 'pending', None)
    if pending is not None and pending():
        return True
    try:
        return bool(_select([sock.fileno()], [], [], 0)[0])
    except (OSError, ValueError):
        return True
