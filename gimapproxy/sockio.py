"""Socket helpers for the hot path: the common case costs one system call.

gevent's `sendall` asks the kernel for the send buffer size, takes the time and builds a
memoryview before its first `send`; a response of a few hundred bytes needs none of
that. `recv_when_ready` waits before it reads where gevent's `recv` would try, fail with
EAGAIN and then wait. `readable` asks the kernel directly, without yielding to the hub
as a monkey-patched `select` does. `Side` is one socket of the relay, which never blocks
on it: the relay waits on both of its sockets at once.

Waiting before reading uses the read watcher each gevent socket keeps (`_read_event`,
waited on with `_wait`): private gevent API, unchanged from gevent 1.3 through 26.
Whether it is there is checked once, at import (SOCKET_WATCHER). Without it, the read is
a plain `recv`. `Side` waits with watchers of its own (`loop.io`, public API) and reads
and writes the system socket a gevent socket wraps (`_sock`, private) when it is there,
and the gevent socket with a zero timeout when not.
"""
from __future__ import annotations

import _socket
import time
from typing import Optional

import gevent
from gevent import monkey, socket, ssl

__all__ = ['send_all', 'recv_when_ready', 'readable', 'Side', 'RECV_SIZE']

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

# gevent's plain sockets wrap a system socket, kept non-blocking, as `_sock`: private API
# too, there from gevent 1.0 through 26. Side checks its type before it uses it; the
# tests flip this to run without it.
RAW_SOCKET = True

RECV_SIZE = 65536


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


class Side:
    """One socket of the relay, non-blocking while the relay runs: reads, a queue of
    bytes to write, and the read and write watchers the relay starts and stops.

    A plain socket is read and written through the system socket gevent wraps (`raw`),
    which spares gevent's Python-level wrapper a call per read and per write; without it
    (RAW_SOCKET false) the gevent socket, with a zero timeout, does the same.

    A TLS write that could not finish must be retried with the same bytes (OpenSSL's
    rule), so the queue's first item is then kept as it is. A TLS operation may also
    need the other readiness (a read that must write, or a write that must read first):
    `cross` then holds the bit of the watcher it waits for.
    """
    __slots__ = ('sock', 'raw', 'tls', 'in_bit', 'out_bit', 'watchers', 'queue', 'queued',
                 'stalled', 'retry', 'cross')

    def __init__(self, sock, loop, in_bit: int, out_bit: int) -> None:
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        raw = getattr(sock, '_sock', None) if RAW_SOCKET and not self.tls else None
        self.raw = raw if isinstance(raw, _socket.socket) else sock
        self.in_bit, self.out_bit = in_bit, out_bit
        fd = sock.fileno()
        self.watchers = {in_bit: loop.io(fd, 1), out_bit: loop.io(fd, 2)}
        self.queue: list = []         # bytes, the first perhaps a memoryview of the rest
        self.queued = 0
        self.stalled: Optional[float] = None   # since when a write could not go on
        self.retry = False            # a TLS write of queue[0] is half done
        self.cross = 0
        sock.settimeout(0.0)

    def pending(self) -> bool:
        """True when a TLS socket holds decrypted bytes the kernel cannot report."""
        return self.tls and self.sock.pending() > 0

    def recv(self) -> Optional[bytes]:
        """Up to RECV_SIZE bytes; b'' at EOF; None when nothing can be read now.
        Raises OSError."""
        if self.tls:
            return self.recv_tls()
        try:
            return self.raw.recv(RECV_SIZE)
        except BlockingIOError:
            return None

    def recv_tls(self) -> Optional[bytes]:
        """A TLS read returns one record at most: read on until nothing more is there or
        RECV_SIZE is reached, so a stream of records costs one wake-up per batch, not
        one per record."""
        chunks, size = [], 0
        while size < RECV_SIZE:
            try:
                data = self.sock.recv(RECV_SIZE - size)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                self.cross = self.out_bit
                break
            except OSError:
                if chunks:
                    break                      # the error comes again on the next read
                raise
            if not data:
                if chunks:
                    break                      # EOF comes again on the next read
                return data
            chunks.append(data)
            size += len(data)
        if not chunks:
            return None
        return chunks[0] if len(chunks) == 1 else b''.join(chunks)

    def more(self, data: bytes) -> bool:
        """After a read of `data`: read again before waiting? Yes when the read filled
        the buffer, or decrypted TLS bytes are left over (no readiness would report
        those)."""
        if len(data) == RECV_SIZE:
            return True
        return self.tls and self.sock.pending() > 0

    def put(self, data: bytes) -> None:
        self.queue.append(data)
        self.queued += len(data)

    def flush(self) -> None:
        """Write what the socket takes now; keep the rest. Raises OSError."""
        queue = self.queue
        while queue:
            if len(queue) > 1 and not self.retry:
                queue[:] = [b''.join(queue)]
            data = queue[0]
            if self.tls:
                sent = self.send_tls(data)
            else:
                try:
                    sent = self.raw.send(data)
                except BlockingIOError:
                    sent = 0
            if not sent:
                if self.stalled is None:
                    self.stalled = time.monotonic()
                return
            self.stalled = None
            self.queued -= sent
            if sent == len(data):
                del queue[0]
            else:
                queue[0] = memoryview(data)[sent:]

    def send_tls(self, data) -> int:
        """Write `data` over TLS without waiting: all of it, or 0 when the socket takes
        none now (then the same bytes must come again)."""
        try:
            sent = self.sock.write(data)
        except ssl.SSLWantWriteError:
            sent = 0
        except ssl.SSLWantReadError:
            self.cross, sent = self.in_bit, 0
        self.retry = not sent
        return sent

    def close(self) -> None:
        """Stop and release the watchers; the socket blocks (gevent-style) again."""
        for watcher in self.watchers.values():
            watcher.close()
        try:
            self.sock.settimeout(None)
        except OSError:
            pass


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
