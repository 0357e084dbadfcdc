"""A scripted fake IMAP server, only for faults a real server will not produce on demand.

It greets, accepts any LOGIN, answers NOOP, and answers any other command with the reply
the test scripted for it (a function of the tag), so a test can make it misbehave.
"""
from __future__ import annotations

from typing import Callable

from gevent import socket
from gevent.server import StreamServer

CAPS = b'IMAP4rev1 LITERAL+ UNSELECT IDLE'


class FakeImap:
    """Start with `start()`; `replies` maps an upper-case command name to a function
    taking the client's tag and returning the bytes to send."""

    def __init__(self, replies: dict[bytes, Callable[[bytes], bytes]],
                 greeting: bytes = b'* OK [CAPABILITY ' + CAPS + b' AUTH=PLAIN] fake ready\r\n',
                 port: int = 0) -> None:
        """`greeting` None: accept and never say anything."""
        self.replies = replies
        self.greeting = greeting
        self.logins = 0
        self.socks = set()               # open connections, ended by stop() as a restart would
        self.server = StreamServer(('127.0.0.1', port), self.handle)

    @property
    def port(self) -> int:
        return self.server.server_port

    def start(self) -> 'FakeImap':
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(1)
        for sock in list(self.socks):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle(self, sock, address) -> None:
        self.socks.add(sock)
        try:
            self.converse(sock)
        except OSError:
            pass                         # stop() ended the connection
        finally:
            self.socks.discard(sock)

    def converse(self, sock) -> None:
        if self.greeting is None:
            sock.recv(1)                 # silent until the proxy gives up
            sock.close()
            return
        sock.sendall(self.greeting)
        reader = sock.makefile('rb')
        try:
            self.serve(sock, reader)
        finally:
            # Close the file too: the socket stays open while a file made from it is.
            reader.close()
            sock.close()

    def serve(self, sock, reader) -> None:
        for line in reader:
            tag, _, rest = line.rstrip(b'\r\n').partition(b' ')
            name = rest.split(b' ')[0].upper()
            if name in self.replies:
                sock.sendall(self.replies[name](tag))
            elif name in (b'LOGIN', b'AUTHENTICATE'):
                self.logins += 1
                sock.sendall(tag + b' OK [CAPABILITY ' + CAPS + b'] Logged in\r\n')
            elif name == b'LOGOUT':
                sock.sendall(b'* BYE bye\r\n' + tag + b' OK done\r\n')
                return
            else:
                sock.sendall(tag + b' OK done\r\n')
