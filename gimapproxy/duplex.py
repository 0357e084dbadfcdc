"""One greenlet waiting on two sockets at once, and blocking on neither.

The relay (gimapproxy.relay) carries both directions of a session in the session's own
greenlet. `Duplex` is its waiting half: a `Side` for each socket, each with a read and a
write watcher on the hub's loop (public gevent API), started and stopped only when what
the relay waits for changes, and a callback that switches into the greenlet only while
it waits in `Duplex.wait`. While the greenlet waits anywhere else (a lease checkout),
an event is kept in `ready` and its watcher stopped until the next `wait`.

A plain socket is read and written through the system socket that the gevent socket
wraps (`_sock`, private gevent API, there from gevent 1.0 through 26; checked by type,
and RAW_SOCKET false runs without it), a TLS socket through its gevent methods with a
zero timeout.
"""
from __future__ import annotations

import _socket
import time
from typing import Optional

import gevent
from gevent import ssl

__all__ = ['Duplex', 'Side', 'CLIENT_IN', 'CLIENT_OUT', 'SERVER_IN', 'SERVER_OUT',
           'RECV_SIZE']

# What woke the greenlet (bits of Duplex.ready).
CLIENT_IN, CLIENT_OUT, SERVER_IN, SERVER_OUT = 1, 2, 4, 8
_WOKEN = 16                       # only ends a wait: no one reads it

RECV_SIZE = 65536

# The tests flip this to run on gevent's socket methods alone.
RAW_SOCKET = True


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
        return len(data) == RECV_SIZE or self.pending()

    def put(self, data: bytes) -> None:
        self.queue.append(data)
        self.queued += len(data)

    def discard(self) -> None:
        """Drop what is queued (the peer is gone)."""
        self.queue.clear()
        self.queued = 0
        self.stalled = None
        self.retry = False

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


class Duplex:
    """The two Sides of one relay and the waiting on them, for the greenlet that
    creates it. `attach` gives it (another) server socket; `close` releases it all."""

    def __init__(self, client_sock) -> None:
        self.hub = gevent.get_hub()
        self.greenlet = gevent.getcurrent()
        self.client = Side(client_sock, self.hub.loop, CLIENT_IN, CLIENT_OUT)
        self.server: Optional[Side] = None
        self.ready = 0                # what woke the greenlet and is not handled yet
        self.armed = 0                # the watchers started
        self.waiting = False          # the greenlet waits in `wait`, nowhere else
        self.timer = None

    def attach(self, sock) -> None:
        """Wait on `sock` as the server from now on."""
        self.detach()
        self.server = Side(sock, self.hub.loop, SERVER_IN, SERVER_OUT)
        for side in (self.client, self.server):
            if side.pending():
                self.ready |= side.in_bit

    def detach(self) -> None:
        """Let the server socket go: it blocks again (gevent-style) for its next
        owner, and nothing of it is waited for."""
        if self.server is not None:
            self.server.close()
            self.server = None
            self.armed &= ~(SERVER_IN | SERVER_OUT)
            self.ready &= ~(SERVER_IN | SERVER_OUT)

    def crossed(self, ready: int) -> int:
        """`ready` with both bits of a Side whose TLS read had to write, or whose write
        had to read, once that readiness came."""
        for side in (self.client, self.server):
            if side.cross & ready:
                side.cross = 0
                ready |= side.in_bit | side.out_bit
        return ready

    def wait(self, want: int, deadline: Optional[float] = None) -> None:
        """Start the watchers of `want` (bits), stop the others, and wait until one of
        them fires, `deadline` (a time.monotonic() value) passes, or `wake` is called."""
        change = want ^ self.armed
        if change:
            for side in (self.client, self.server):
                for bit, watcher in side.watchers.items():
                    if change & bit:
                        if want & bit:
                            watcher.start(self.on_ready, bit)
                        else:
                            watcher.stop()
            self.armed = want
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        if deadline is not None:
            self.timer = self.hub.loop.timer(max(0.0, deadline - time.monotonic()))
            self.timer.start(self.wake)
        self.waiting = True
        try:
            self.hub.switch()
        finally:
            self.waiting = False

    def on_ready(self, bit: int) -> None:
        """A watcher's callback, in the hub."""
        self.ready |= bit
        if self.waiting:
            self.waiting = False
            self.greenlet.switch()
        else:
            side = self.client if bit & (CLIENT_IN | CLIENT_OUT) else self.server
            side.watchers[bit].stop()
            self.armed &= ~bit

    def wake(self) -> None:
        """End a `wait` from the hub (a timer's callback); the greenlet sees _WOKEN."""
        self.ready |= _WOKEN
        if self.waiting:
            self.waiting = False
            self.greenlet.switch()

    def close(self) -> None:
        """Release the watchers and the timer; both sockets block again."""
        if self.timer is not None:
            self.timer.close()
        self.client.close()
        self.detach()
